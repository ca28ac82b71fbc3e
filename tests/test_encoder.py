"""`raywsl train-encoder`: a point-cloud encoder to the fitted rows under Ray Train (2 CPU workers, gloo),
its artifact and held-out figures, the API the topology probes use, reuse, config checks; and the opt-in
corpus categories of data.source (corpus:N:cat1,cat2)."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from raywsl import contract as C
from raywsl.cli import main
from raywsl.config import ConfigError, load_config
from raywsl.encoder import EncoderError, load_encoder
from raywsl.encoder.model import draw_subsets, r_squared
from raywsl.geometry.extract import decode_rows
from raywsl.models.fields import field_of
from raywsl.models.pointnet import ENCODERS, make_encoder
from raywsl.models.registry import check_config
from raywsl.stages import check, plan_for
from raywsl.store.rows import RowStore, StoreError

FINAL = C.STAGES["train-encoder"].produces  # checkpoints/encoder_final: the run folder's link to the encoder
STEPS = 200
# 12 corpus shapes, 3 held out (rows 0-2), 9 fitted tiny MLPs (1,601 parameters); a small encoder.
ARGS = ["data.source=corpus:12", "ingest.points=2048", "ingest.surface_points=512", "ingest.shard_size=4",
        "ingest.test_fraction=0.32", "field.preset=tiny", "fit.steps=100", "fit.points_per_step=512",
        "fit.batch_size=8", "fit.shard_size=4", f"encoder.steps={STEPS}", "encoder.width=64", "encoder.points=128",
        "encoder.lr=0.003", "encoder.eval_count=2", "encoder.resolution=24", "encoder.workers=2",
        "encoder.log_every=10", "encoder.checkpoint_every=50"]


def _plan(*args: str, encoder: bool = True):
    cfg = check_config(load_config(None, list(args)))
    return cfg, plan_for(cfg, encoder=encoder)


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    """(run folder, its config args) after one `raywsl train-encoder` (corpus, ingest, fit, encoder)."""
    run = tmp_path_factory.mktemp("encoder") / "run"
    args = [f"run.dir={run}", *ARGS]
    assert main(["train-encoder", *args]) == 0
    return run, args


# ------------------------------------------------------------------------------------ the stage

@pytest.mark.ray
def test_train_encoder_publishes_its_state_and_held_out_figures(trained):
    run, _ = trained
    folder = run / FINAL
    state = torch.load(folder / C.CHECKPOINT_STATE, weights_only=True)  # safe: tensors and numbers only
    info = json.loads((folder / C.CHECKPOINT_INFO).read_text())
    assert state["step"] == info["step"] == info["metrics"]["step"] == STEPS and state["skipped_steps"] == 0
    assert info["arch"] == "pointnet" and info["width"] == 64 and info["points"] == 128 and info["params"] == 1601
    losses = [h["loss"] for h in info["history"]]
    assert len(losses) == STEPS // 10 and losses[-1] < 0.5 * losses[0], losses  # it learns the training rows
    figures = json.loads((folder / C.STAGE_METRICS).read_text())
    assert figures["encoder_heldout_count"] == 2 and figures["encoder_train_count"] == 2
    # 9 training shapes teach nothing that carries over: the held-out figures are only defined (0.18-0.5
    # measured); the training shapes come back close to their fitted rows' own figure (0.027 vs 0.025)
    assert all(0 < figures[k] < 2 for k in ("encoder_heldout_cd_median", "encoder_mean_row_cd_median")), figures
    assert figures["encoder_fitted_cd_median"] < 0.1 and figures["encoder_train_cd_median"] < 0.1, figures
    assert figures["encoder_r2_rows"] == 9 and 0.3 < figures["encoder_r2_train"] <= 1, figures
    sets = [e["set"] for e in figures["encoder"]["shapes"]]
    assert sets == ["heldout", "heldout", "train", "train"]
    assert all(e["row"] < 3 for e in figures["encoder"]["shapes"][:2])  # the held-out rows come first
    assert (folder / C.ENCODER_LOSS).stat().st_size > 0 and (folder / C.ENCODER_RECON).stat().st_size > 0
    run_metrics = json.loads((run / C.METRICS).read_text())  # merged into the run's figures
    assert run_metrics["encoder_heldout_cd_median"] == figures["encoder_heldout_cd_median"]
    stages = json.loads((run / C.STAGES_FILE).read_text())["stages"]
    assert list(stages) == ["corpus", "ingest", "fit", "train-encoder"] and not stages["train-encoder"]["reused"]
    log = (run / C.LOGS / "train-encoder.log").read_text()
    assert "held-out shapes encoded and decoded: Chamfer median" in log
    assert not (run.parent / C.CACHE / "train-encoder" / (folder.resolve().name + C.WORK_SUFFIX)).exists()


@pytest.mark.ray
def test_the_probes_api_encodes_any_cloud_to_rows_that_decode(trained):
    run, args = trained
    cfg, plan = _plan(*args)
    enc = load_encoder(cfg, plan)
    weights = RowStore.open(str(run / C.WEIGHTS))
    assert enc.field.layout == field_of(weights).layout and enc.width == 64 and enc.points == 128
    rng = np.random.default_rng(0)
    for n, s in ((3, 77), (2, 1000), (1, 1)):  # any number of points
        clouds = rng.normal(size=(n, s, 3)).astype(np.float32)
        c = enc.conditions(clouds)
        assert c.shape == (n, 64) and c.dtype == torch.float32
        assert torch.equal(enc.conditions(torch.from_numpy(clouds[:, ::-1].copy())), c)  # the points' order: none
        rows = enc.rows(c)
        assert rows.shape == (n, 1601) and torch.isfinite(rows).all()
    # the training shapes' clouds give rows near their fitted ones (closer than the mean row is)
    samples = RowStore.open(str(run / C.SAMPLES))
    assert samples.attrs[C.Attr.HELD_OUT] == 3  # rows 0-2 held out, 3-11 fitted
    rows = enc.encode(samples.group[C.SURFACE][3:12, :128])
    fitted = torch.from_numpy(weights.group[C.ROW_WEIGHTS][3:12])
    assert (rows - fitted).square().sum() < 0.7 * (fitted - fitted.mean(0)).square().sum()
    decoded = decode_rows(enc.field.bind, rows[:2], 24)
    assert all(ex.ok for ex in decoded), [ex.reason for ex in decoded]
    with pytest.raises(EncoderError, match=r"\(n, S, 3\)"):
        enc.conditions(np.zeros((5, 3), np.float32))
    with pytest.raises(EncoderError, match=r"plan_for\(cfg, encoder=True\)"):
        load_encoder(cfg, plan_for(cfg))


@pytest.mark.ray
def test_a_second_call_reuses_the_encoder(trained):
    run, args = trained
    before = (run / FINAL / C.CHECKPOINT_STATE).stat().st_mtime_ns
    assert main(["train-encoder", *args]) == 0
    stages = json.loads((run / C.STAGES_FILE).read_text())["stages"]
    assert all(e["reused"] for e in stages.values()) and (run / FINAL / C.CHECKPOINT_STATE).stat().st_mtime_ns == before


@pytest.mark.ray
def test_the_topology_probes_read_the_encoder(trained):
    """`raywsl probe phase` (the study's protocol) and `probe subspace --space condition` on the encoder's
    run: the encoder is reused, the path starts at the Fibonacci sphere's own decode."""
    from raywsl.probes.common import decode
    from raywsl.probes.phase import fibonacci_sphere

    run, args = trained
    assert main(["probe", "phase", *args, "--steps", "3", "--seeds", "2", "--points", "200", "--resolution", "24"]) == 0
    assert json.loads((run / C.STAGES_FILE).read_text())["stages"]["train-encoder"]["reused"]
    summary = json.loads((run / C.PROBE / "phase-cloud" / C.PROBE_SUMMARY).read_text())
    radius = 0.6  # the default: the size of the corpus's blobs
    assert summary["space"] == "cloud" and summary["settings"]["radius"] == radius
    assert "Fibonacci sphere (200 points" in summary["path"] and len(summary["seeds"]) == 2
    with open(run / C.PROBE / "phase-cloud" / C.PHASE_PATH, newline="") as f:
        first = next(csv.DictReader(f))
    cfg, plan = _plan(*args)
    enc = load_encoder(cfg, plan)
    (t,), _ = decode(enc.field, enc.encode(fibonacci_sphere(200, radius)[None]).numpy(), 24, "cpu")
    assert (int(first["major_components"]), int(first["euler"])) == (t["major_components"], t["euler"])
    # --encoders K repeats each seed's path through each encoder: here twice the same one, so equal figures
    from raywsl.probes.phase import PhaseSettings, run_phase
    twice = run_phase(cfg, plan, PhaseSettings(steps=3, seeds=1, points=200, resolution=24, encoders=2),
                      [(cfg, plan), (cfg, plan)])
    assert [t["encoder"] for t in twice["seeds"]] == [0, 1]
    same = [json.dumps({k: v for k, v in t.items() if k != "encoder"}, sort_keys=True)  # NaN-safe
            for t in (twice["seeds"][0], twice["seeds"][1], summary["seeds"][0])]
    assert same[0] == same[1] == same[2]

    assert main(["probe", "subspace", *args, "--space", "condition", "--category", "", "--dims", "2", "--radii", "1",
                 "--samples", "2", "--paths", "0", "--resolution", "24", "--points", "128"]) == 0
    summary = json.loads((run / C.PROBE / "subspace-condition" / C.PROBE_SUMMARY).read_text())
    assert summary["space"] == "condition" and summary["shapes"] == 9 and summary["dims"] == [2]
    assert [(t["kind"], t["n"]) for t in summary["table"]] == [("training", 9), ("sample", 2)]


# ------------------------------------------------------------------------------------ plans and configs

def test_only_train_encoder_plans_the_encoder(tmp_path):
    args = [f"run.dir={tmp_path}/run", "data.source=corpus:12"]
    cfg, plan = _plan(*args, encoder=False)
    assert "train-encoder" not in plan.stages  # `raywsl run` runs plan.stages
    _, planned = _plan(*args)
    assert planned.stages == ["corpus", "ingest", "fit", "recon", "train-encoder", "train", "sample", "eval", "report"]
    assert C.STAGES["train-encoder"].consumes == ("ingest", "fit")

    def fp(*more: str) -> str:
        return _plan(*args, *more)[1]["train-encoder"].fingerprint

    assert fp() == fp("encoder.workers=2") == fp("encoder.checkpoint_every=7")  # where it runs decides nothing
    assert len({fp(), fp("encoder.steps=7"), fp("encoder.width=8"), fp("field.preset=tiny"), fp("data.shapes=5"),
                fp("ingest.points=999"), fp("seed=1")}) == 7


@pytest.mark.parametrize("override, words", [
    ("encoder.arch=transformer", ["'encoder.arch'", "'transformer'", "pointnet"]),
    ("encoder.points=0", ["'encoder.points'", ">= 1"]),
    ("encoder.uneven=2", ["'encoder.uneven'", "<= 1"]),
])
def test_bad_encoder_keys_are_refused_before_any_work(tmp_path, capsys, override, words):
    assert main(["train-encoder", f"run.dir={tmp_path}/run", "data.source=corpus:4", override]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not (tmp_path / "run").exists()
    assert sorted(ENCODERS) == ["pointnet"]  # the config's choices


def test_train_encoder_needs_fitted_training_rows(tmp_path):
    cfg, plan = _plan(f"run.dir={tmp_path}/run", "data.source=corpus:4")
    with pytest.raises(StoreError, match="run `raywsl fit`"):
        check(cfg, plan, "train-encoder")


def test_subsets_even_and_uneven():
    gen = torch.Generator().manual_seed(0)
    sphere = torch.nn.functional.normalize(torch.randn(64, 2000, 3, generator=gen), dim=2)
    even, uneven = draw_subsets(sphere, 200, 0.0, gen), draw_subsets(sphere, 200, 1.0, gen)
    assert even.shape == uneven.shape == (64, 200, 3)
    assert all(len(torch.unique(cloud, dim=0)) == 200 for cloud in even[:4])  # without replacement
    # an uneven subset leans to one side: its centroid is off the sphere's centre
    assert uneven.mean(1).norm(dim=1).mean() > 3 * even.mean(1).norm(dim=1).mean()
    assert draw_subsets(sphere[:2, :50], 200, 0.5, gen).shape == (2, 50, 3)  # fewer points than asked: all


def test_encoder_network_and_r_squared():
    torch.manual_seed(0)
    net = make_encoder("pointnet", 16, 40)
    x = torch.randn(3, 50, 3)
    assert net.encode(x).shape == (3, 16) and torch.equal(net(x), torch.zeros(3, 40))  # starts at the mean row
    target = torch.randn(20, 40)
    assert r_squared(target, target) == 1.0 and abs(r_squared(target.mean(0).expand(20, -1), target)) < 1e-6
    assert math.isnan(r_squared(torch.zeros(2, 3), torch.ones(2, 3)))


# ------------------------------------------------------------------------------------ corpus categories

def test_corpus_source_with_categories():
    cfg = load_config(None, ["data.source=corpus:6:bracket,mug"])
    assert cfg.corpus_size == 6 and cfg.corpus_categories == ["bracket", "mug"]
    plain = load_config(None, ["data.source=corpus:6"])
    assert plain.corpus_size == 6 and plain.corpus_categories is None
    assert load_config().corpus_categories is None
    fps = {s: C.stage_fingerprint("corpus", load_config(None, [f"data.source={s}"]), {})
           for s in ("corpus:6", "corpus:6:bracket")}
    assert fps["corpus:6"] != fps["corpus:6:bracket"]
    with pytest.raises(ConfigError, match="data.source.*corpus:N:cat1,cat2"):
        load_config(None, ["data.source=corpus:6:bracket,,mug"])
    with pytest.raises(ConfigError, match="data.source.*unknown corpus categories \\['brackets'\\]"):
        plan_for(load_config(None, ["data.source=corpus:6:brackets"]))


@pytest.mark.ray
def test_a_bracket_corpus_stage(ray_local, tmp_path):
    from raywsl.stages import produce

    cfg = load_config(None, [f"run.dir={tmp_path}/run", "data.source=corpus:6:bracket"])
    plan = plan_for(cfg)
    assert produce(cfg, plan, "corpus").facts == {"corpus_shapes": 6}
    with open(plan.source) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["category"] for r in rows} == {"bracket"}
