import subprocess
import sys
from pathlib import Path

import pytest

from raywsl.cli import main
from raywsl.config import Config, ConfigError, describe, load_config, to_dict
from raywsl.contract import fingerprint
from raywsl.models.registry import check_config


def load(path=None, overrides=()):
    """What the CLI does: the config's own checks, then the registries'."""
    return check_config(load_config(path, overrides))


def test_defaults_are_the_laptop_setup_and_valid():
    cfg = load_config()
    assert cfg.ingest.points == 200_000 and cfg.ingest.surface_points == 16_384
    assert cfg.ingest.backend == "igl" and cfg.seed == 0
    assert cfg.run_dir == "runs/default"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run: {name: a}\ningest: {points: 1000, mix: [0.5, 0.3, 0.2]}\n")
    cfg = load_config(path, ["ingest.points=4096", "run.dir=/tmp/x", "seed=3", "ingest.near_sigmas=[0.01, 0.1]"])
    assert cfg.ingest.points == 4096 and cfg.ingest.mix == [0.5, 0.3, 0.2]
    assert cfg.run_dir == "/tmp/x" and cfg.seed == 3 and cfg.ingest.near_sigmas == [0.01, 0.1]
    assert isinstance(cfg.ingest.margin, float)


@pytest.mark.parametrize("override, words", [
    ("ingest.pionts=5", ["unknown config key 'ingest.pionts'", "did you mean 'ingest.points'"]),
    ("nosuch.key=1", ["unknown config key 'nosuch'"]),
    ("ingest.points=many", ["'ingest.points'", "expected int", "'many'"]),
    ("ingest.points=1.5", ["'ingest.points'", "expected int"]),
    ("ingest.points=0", ["'ingest.points'", "bad value 0", ">= 1"]),
    ("ingest.mix=[0.5, 0.5, 0.5]", ["'ingest.mix'", "summing to 1"]),
    ("ingest.backend=magic", ["'ingest.backend'", "'magic'", "igl", "mesh_to_sdf"]),
    ("ingest.near_sigmas=0.1", ["'ingest.near_sigmas'", "expected a list"]),
    ("ingest=3", ["'ingest'", "must be a section"]),
    ("ingest.points", ["not of the form key.sub=value"]),
])
def test_bad_keys_and_values_name_key_value_and_allowed(override, words):
    with pytest.raises(ConfigError) as e:
        load(None, [override])
    for w in words:
        assert w in str(e.value)


def test_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")


def test_fingerprint_covers_exactly_the_deciding_fields():
    base = to_dict(load_config(), fingerprint_only=True)
    assert "ray" in base and "address" not in base["ray"] and "name" not in base["run"]
    assert fingerprint(base) == fingerprint(to_dict(load_config(None, ["ray.address=x:1", "run.name=b"]), True))
    assert fingerprint(base) != fingerprint(to_dict(load_config(None, ["ingest.points=7"]), True))
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})


def test_every_field_documented():
    rows = describe(Config)
    keys = {k for k, _, _ in rows}
    assert {"run.name", "run.dir", "data.source", "ingest.points", "ingest.surface_points",
            "ingest.backend", "seed"} <= keys
    assert all(h for _, _, h in rows)


def test_cli_config_error_fails_before_work(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["ingest", f"run.dir={run_dir}", "ingest.pionts=3"])
    assert code == 2
    assert "did you mean 'ingest.points'" in capsys.readouterr().err
    assert not run_dir.exists()


def test_help_lists_config_keys_with_defaults():
    out = subprocess.run([sys.executable, "-m", "raywsl.cli", "ingest", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "ingest.points" in out and "200000" in out and "data.source" in out


def test_lora_rank_is_one_number_or_one_per_layer():
    assert load_config(None, ["field.rank=8"]).field.rank == 8
    assert load_config(None, ["field.rank=[8,4,4,2]"]).field.rank == [8, 4, 4, 2]
    for bad in ("[]", "0", "[4,0]", "[4,x]"):
        with pytest.raises(ConfigError, match="field.rank"):
            load_config(None, [f"field.rank={bad}"])


def test_trained_init_only_for_fields_with_trained_rows():
    assert load_config(None, ["field.type=deepsdf_latent", "field.preset=default", "fit.init=trained"])
    with pytest.raises(ConfigError, match="trained: deepsdf_latent only"):
        load_config(None, ["fit.init=trained"])


def test_shipped_configs_load():
    for path in sorted(Path(__file__).parent.parent.glob("configs/*.yaml")):
        load(path)


def test_registries_are_checked():
    with pytest.raises(ConfigError, match="diffusion.tokenizer.*one of"):
        load(None, ["diffusion.tokenizer=lyr"])
    with pytest.raises(ConfigError, match="diffusion.model"):
        load(None, ["diffusion.model=huge"])
    with pytest.raises(ConfigError, match="field.preset.*for field.type mlp"):
        load(None, ["field.preset=shapenet"])


def test_corpus_source_and_derived_keys():
    cfg = load_config(None, ["data.source=corpus:12", "data.shapes=5"])
    assert cfg.corpus_size == 12 and cfg.base_shapes == 5 and cfg.ingest_shapes == 5
    cfg = load_config(None, ["data.shapes=5", "base.shapes=9"])
    assert cfg.base_shapes == 9 and cfg.ingest_shapes == 9 and cfg.corpus_size is None
    assert load_config(None, ["base.shapes=9"]).ingest_shapes == 0  # data.shapes 0: every shape
    assert load_config(None, ["run.dir=a/b/run1"]).cache_dir == "a/b/cache"
    assert load_config(None, ["run.dir=a/run1", "cache.dir=/c"]).cache_dir == "/c"
    for bad in ("corpus:0", "corpus:x", "corpus:"):
        with pytest.raises(ConfigError, match="data.source"):
            load_config(None, [f"data.source={bad}"])


def test_cuda_devices_need_the_gpu_switch():
    for key in ("fit.device", "eval.device"):
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"{key}=cuda"])
        message = str(e.value)
        assert f"'{key}' is 'cuda' but scaling.use_gpu is false" in message and "set scaling.use_gpu=true" in message
        assert load_config(None, [f"{key}=cuda", "scaling.use_gpu=true"])
    assert load_config(None, ["fit.device=cpu", "eval.device=auto"])  # auto and cpu need no switch


def test_gpus_per_actor_is_a_fraction_or_whole_gpus():
    assert load_config(None, ["fit.gpus_per_actor=0.25"]).fit.gpus_per_actor == 0.25
    assert load_config(None, ["fit.gpus_per_actor=2"]).fit.gpus_per_actor == 2.0
    for bad in ("0", "-1", "1.5"):
        with pytest.raises(ConfigError, match="fit.gpus_per_actor.*a fraction in \\(0, 1\\]"):
            load_config(None, [f"fit.gpus_per_actor={bad}"])


def test_resources_do_not_change_fingerprints():
    plain = to_dict(load_config(), fingerprint_only=True)
    placed = to_dict(load_config(None, ["scaling.use_gpu=true", "fit.gpus_per_actor=0.5", "scaling.cpus_per_task=4",
                                        "fit.device=cuda", "eval.device=cuda"]), fingerprint_only=True)
    assert fingerprint(plain) == fingerprint(placed)


def test_base_use_gpu_moved_to_the_one_gpu_switch(tmp_path, caplog):
    """base.use_gpu (train-base's own switch before scaling.use_gpu was the run's) still loads."""
    old = tmp_path / "old.yaml"
    old.write_text("base: {use_gpu: true, workers: 1}\n")
    cfg = load_config(old)
    assert cfg.scaling.use_gpu and cfg.base.workers == 1 and not hasattr(cfg.base, "use_gpu")
    assert load_config(None, ["base.use_gpu=true"]).scaling.use_gpu  # as an override too
    assert not load_config(old, ["scaling.use_gpu=false"]).scaling.use_gpu  # a later override wins
    # a config.yaml saved before the move lists both keys: scaling.use_gpu decides, the other is named
    saved = tmp_path / "saved.yaml"
    saved.write_text("base: {use_gpu: true}\nscaling: {use_gpu: false}\n")
    assert not load_config(saved).scaling.use_gpu
    assert "'base.use_gpu: True' is ignored: 'scaling.use_gpu' (False) now decides" in caplog.text
    both = tmp_path / "both.yaml"
    both.write_text("base: {use_gpu: false}\nscaling: {use_gpu: false}\n")
    assert not load_config(both).scaling.use_gpu
