"""The weight-space stability experiment (papers/004 §4.2) on a small real run folder: the init
mixing, λ = 0 as a fixed point, outputs, and argument errors."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import ingest_corpus

from raywsl import contract as C
from raywsl.config import load_config
from raywsl.fit import stability
from raywsl.fit.stability import StabilityError, perturbed_init, run_stability
from raywsl.models.fields import FieldError, field_from_config
from raywsl.store.rows import RowStore, StoreError

N_SHAPES = 3
INGEST = ["ingest.points=4096", "ingest.surface_points=1024", "ingest.shard_size=4", "ingest.test_fraction=0"]
SMALL = ["field.preset=tiny", "fit.steps=150", "fit.points_per_step=512", "fit.check_every=20",
         "fit.recon_resolution=32", "fit.device=cpu"]
VARIANTS = ["mlp", "mlp-asym"]
LAMBDAS = [0.0, 1.0]


@pytest.fixture(scope="module")
def ingested(ray_local, tmp_path_factory):
    """A run folder with samples.zarr of N_SHAPES corpus shapes (none held out)."""
    return ingest_corpus(tmp_path_factory.mktemp("stability"), N_SHAPES, INGEST)[0]


@pytest.fixture(scope="module")
def result(ingested):
    cfg = load_config(None, [f"run.dir={ingested}", *SMALL])
    return run_stability(cfg, VARIANTS, LAMBDAS, n_shapes=N_SHAPES, samples=str(ingested / C.SAMPLES))


def _entry(result, variant, lam):
    [r] = [r for r in result["results"] if r["variant"] == variant and r["lambda"] == lam]
    return r


# ------------------------------------------------------------------------------------ the init mixing

def test_perturbed_init_mixes_every_entry_around_the_mean():
    # an mlora-like init: a_0, b_0 ~ 1 + noise, the rest noise around 0; every entry is mixed
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    mean = torch.cat([torch.ones(16), torch.zeros(1000)])
    i1, i2 = mean + torch.randn(1016, generator=g1), mean + torch.randn(1016, generator=g2)
    for lam in (0.0, 0.3, 0.6, 1.0):
        mixed = perturbed_init(i1, i2, lam, mean)
        expected = mean.double() + math.sqrt(1 - lam**2) * (i1 - mean).double() + lam * (i2 - mean).double()
        assert mixed.dtype == i1.dtype
        torch.testing.assert_close(mixed, expected.float())
    assert torch.equal(perturbed_init(i1, i2, 0.0, mean), i1)
    torch.testing.assert_close(perturbed_init(i1, i2, 1.0, mean), i2)  # independent of ι1 at λ = 1
    # the mean is not rescaled to (sqrt(1 - λ²) + λ) μ: a_0 stays around 1
    assert abs(float(perturbed_init(i1, i2, 0.7, mean)[:16].mean()) - 1.0) < 0.5
    # variance preserving: independent N(0, 1) entries stay N(0, 1)
    big1, big2 = torch.randn(200_000, generator=g1), torch.randn(200_000, generator=g2)
    assert abs(float(perturbed_init(big1, big2, 0.6).var()) - 1.0) < 0.02
    with pytest.raises(StabilityError, match=r"\[0, 1\]"):
        perturbed_init(i1, i2, 1.5)


def test_variant_config_picks_type_asym_and_preset(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}", "field.preset=tiny", "field.kappa=2.0"])
    c = stability.variant_config(cfg, "fourier-asym")
    assert (c.field.type, c.field.asym, c.field.preset, c.field.kappa) == ("fourier", True, "tiny", 2.0)
    c = stability.variant_config(cfg, "mlora")
    assert (c.field.type, c.field.asym, c.field.preset) == ("mlora", False, "default")
    assert cfg.field.type == "mlp" and not cfg.field.asym  # the original is untouched


def test_bad_arguments_are_clear_errors(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}", *SMALL])
    nothing = str(tmp_path / "nothing.zarr")
    with pytest.raises(StabilityError, match=r"variants: unknown field type 'siren' in 'siren-asym'; known .*'mlp'"):
        run_stability(cfg, ["siren-asym"], [0.5], 1, nothing)
    with pytest.raises(StabilityError, match=r"lambdas: .*\[0, 1\], got \[1.5\]"):
        run_stability(cfg, ["mlp"], [0.0, 1.5], 1, nothing)
    with pytest.raises(StabilityError, match="lambdas"):
        run_stability(cfg, ["mlp"], [], 1, nothing)
    with pytest.raises(StabilityError, match="n_shapes"):
        run_stability(cfg, ["mlp"], [0.5], 0, nothing)
    with pytest.raises(StoreError, match="raywsl ingest"):  # nothing ingested there
        run_stability(cfg, ["mlp"], [0.5], 1, nothing)


# ------------------------------------------------------------------------------------ the experiment

@pytest.mark.ray
@pytest.mark.timeout(240)
def test_lambda_zero_is_a_fixed_point(result):
    for variant in VARIANTS:
        r = _entry(result, variant, 0.0)
        assert r["n"] == N_SHAPES and r["fit_failed"] == 0
        assert r["no_surface"] < N_SHAPES, r["failures"]
        for e in r["shapes"]:
            if not np.isfinite(e["endpoint_cd"]):  # a field with no surface yet: so is its midpoint
                assert e["no_surface"] and not np.isfinite(e["barrier"])
                continue
            # ι_0 = ι1 and the engine is deterministic per shape: the same fit, the same midpoint
            assert e["cosine"] == pytest.approx(1.0, abs=1e-6)
            assert np.isfinite(e["barrier"]) and e["barrier"] == pytest.approx(e["endpoint_cd"], rel=1e-9)
            assert e["endpoint_lambda_cd"] == pytest.approx(e["endpoint_cd"], rel=1e-9)
        assert r["cosine_std"] < 1e-6


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_full_perturbation_lands_elsewhere(result):
    r = _entry(result, "mlp", 1.0)
    assert r["n"] == N_SHAPES
    assert r["cosine_mean"] < 0.9  # independent inits: the fitted rows differ clearly
    endpoint = _entry(result, "mlp", 0.0)["endpoint_cd_mean"]
    assert r["endpoint_cd_mean"] == pytest.approx(endpoint)  # φ itself does not depend on λ
    finite = [e["barrier"] for e in r["shapes"] if np.isfinite(e["barrier"])]
    assert len(finite) + r["no_surface"] + r["fit_failed"] == N_SHAPES
    assert all(e["reason"] for e in r["shapes"] if not np.isfinite(e["barrier"]))  # every gap says why


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_outputs_on_disk(result, ingested):
    out = ingested / C.STABILITY
    on_disk = json.loads((out / "stability.json").read_text())
    assert [(r["variant"], r["lambda"]) for r in on_disk["results"]] == \
        [(v, lam) for v in VARIANTS for lam in LAMBDAS]  # one entry per variant x λ, in the order asked
    assert on_disk["settings"]["lambdas"] == LAMBDAS and len(on_disk["settings"]["shapes"]) == N_SHAPES
    assert set(on_disk["conventions"]) >= {"init", "cosine", "barrier", "chamfer"}
    v = on_disk["variants"]
    assert v["mlp"]["params"] == 1601 and 0 < v["mlp-asym"]["params"] < 1601  # masked entries leave the row
    assert v["mlp-asym"]["asym"] and v["mlp"]["preset"] == "tiny"
    table = (out / "stability.md").read_text()
    assert "| variant | params | λ | cosine mean ± std | barrier CD mean ± std |" in table
    assert sum(line.startswith("| mlp") for line in table.splitlines()) == len(VARIANTS) * len(LAMBDAS)
    assert (out / "stability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_uses_the_first_training_shapes(result, ingested):
    samples = RowStore.open(str(ingested / C.SAMPLES))
    ids = [str(i) for i in samples.row_meta()[C.SHAPE_ID]]
    assert result["settings"]["shapes"] == ids[:N_SHAPES]  # the training order (store/split.py)


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_mlora_start_stays_around_its_mean_and_lambda_zero_is_a_fixed_point(ingested, tiny_base, tmp_path):
    run = tmp_path / "run"  # its own run folder (outputs), sharing the ingested samples
    cfg = load_config(None, [f"run.dir={run}", f"field.base={tiny_base}", "field.rank=2", *SMALL])
    field = field_from_config(stability.variant_config(cfg, "mlora"))
    i1 = field.init_rows(1, torch.Generator().manual_seed(cfg.seed))[0]
    i2 = field.init_rows(1, torch.Generator().manual_seed(cfg.seed + 1))[0]
    mean = field.init_mean()
    for lam in (0.5, 1.0):  # every entry perturbed, around B A = 1
        mixed = perturbed_init(i1, i2, lam, mean)
        a0 = field.layout.unflatten(mixed[None])["block0.fc0.a0"]
        assert not torch.equal(mixed, i1) and (mixed != i1).all()
        assert abs(float(a0.mean()) - 1.0) < 0.25 and float(a0.std()) > 0.05

    result = run_stability(cfg, ["mlora-asym"], [0.0, 0.5], n_shapes=2, samples=str(ingested / C.SAMPLES))
    r0 = _entry(result, "mlora-asym", 0.0)
    assert r0["fit_failed"] == 0 and r0["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert r0["no_surface"] < 2
    for e in r0["shapes"]:
        assert e["barrier"] == pytest.approx(e["endpoint_cd"], rel=1e-9, nan_ok=True)
    masked = field_from_config(stability.variant_config(cfg, "mlora-asym"))
    assert result["variants"]["mlora-asym"]["params"] == masked.layout.size < field.layout.size
    assert (run / C.STABILITY / "stability.json").exists()


def test_lora_on_a_missing_base_is_a_clear_error(ingested, tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path}", f"field.base={tmp_path / 'nowhere'}", *SMALL])
    with pytest.raises(FieldError, match="train-base"):
        run_stability(cfg, ["lora"], [0.5], 1, str(ingested / C.SAMPLES))
