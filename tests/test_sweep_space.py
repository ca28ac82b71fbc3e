"""Sweep configs: search-space parsing, expansion into trials, clear errors; the onset estimator."""

import math

import numpy as np
import pytest
import yaml

from raywsl.sweep.onset import Rule, estimate_onset, onset_index
from raywsl.sweep.space import SweepError, load_sweep, parse_sweep, trial_name

BASE = "configs/quickstart.yaml"


def sweep(**raw):
    return parse_sweep({"name": "t", "base": BASE, **raw})


def test_grid_axes_multiply_in_a_fixed_order_and_pin_the_base_to_the_largest_scale():
    s = sweep(scale=[20, 50], variants={"mlp-warm": {"field.type": "mlp", "fit.init": "warm"},
                                        "mlora-asym": {"field.type": "mlora", "field.preset": "default",
                                                       "field.asym": True}},
              space={"field.rank": {"grid": [4, 8]}}, seeds=[0, 1])
    assert len(s.trials) == 2 * 2 * 2 * 2
    first = s.trials[0]
    assert first.name == "N=20,mlp-warm,rank=4,seed=0"
    assert first.params == {"data.shapes": 20, "variant": "mlp-warm", "field.rank": 4, "diffusion.seed": 0}
    c = first.config
    assert (c.data.shapes, c.field.type, c.fit.init, c.field.rank, c.diffusion.seed) == (20, "mlp", "warm", 4, 0)
    assert c.base.shapes == 50
    last = s.trials[-1].config
    assert (last.data.shapes, last.field.type, last.field.asym, last.field.rank, last.diffusion.seed) == (
        50, "mlora", True, 8, 1)
    assert c.seed == last.seed == 0  # seeds vary the diffusion run; the data split and fits stay
    assert len({t.name for t in s.trials}) == len(s.trials)
    # the quickstart's own settings stay where the sweep does not touch them
    assert c.fit.steps == 400 and c.data.source == "corpus:64"


def test_sampled_axes_are_drawn_per_grid_point_the_same_way_every_time():
    raw = dict(space={"train.lr": {"loguniform": [1e-4, 1e-2]}, "field.kappa": {"uniform": [1.0, 6.0]},
                      "diffusion.prediction": {"choice": ["eps", "x0"]}}, seeds=[0, 1], samples=3)
    a, b = sweep(**raw), sweep(**raw)
    assert [t.name for t in a.trials] == [t.name for t in b.trials]
    assert 4 <= len(a.trials) <= 6  # 2 seeds x 3 draws, minus draws that repeat a trial
    lrs = [t.config.train.lr for t in a.trials]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and len(set(lrs)) == len(lrs)
    assert all(1.0 <= t.config.field.kappa <= 6.0 for t in a.trials)
    assert {t.config.diffusion.prediction for t in a.trials} <= {"eps", "x0"}
    assert a.trials[0].config.diffusion.seed == 0


def test_a_variants_own_grid_axis_multiplies_only_its_trials():
    s = sweep(scale=[20], variants={"mlp": {"field.type": "mlp"},
                                    "mlora-asym": {"field.type": "mlora", "field.preset": "default", "field.asym": True,
                                                   "field.kappa": {"grid": [2.0, 6.0]}}}, seeds=[0])
    assert [t.name for t in s.trials] == ["N=20,mlp,seed=0", "N=20,mlora-asym,kappa=2,seed=0",
                                          "N=20,mlora-asym,kappa=6,seed=0"]
    assert [t.config.field.kappa for t in s.trials] == [6.0, 2.0, 6.0]  # mlp keeps the default
    assert s.trials[1].params == {"data.shapes": 20, "variant": "mlora-asym", "field.kappa": 2.0, "diffusion.seed": 0}


def test_a_variant_can_run_at_some_of_the_scales_and_seeds_only():
    s = sweep(scale=[20, 50], seeds=[0, 1],
              variants={"mlp": {"field.type": "mlp"},
                        "grid": {"field.type": "mlp", "data.shapes": {"grid": [50]}, "diffusion.seed": {"grid": [1]},
                                 "field.mask_seed": {"grid": [1, 2]}}})
    assert [t.name for t in s.trials] == ["N=20,mlp,seed=0", "N=20,mlp,seed=1", "N=50,mlp,seed=0", "N=50,mlp,seed=1",
                                          "N=50,grid,mask_seed=1,seed=1", "N=50,grid,mask_seed=2,seed=1"]
    assert s.trials[-1].config.data.shapes == 50 and s.trials[-1].config.field.mask_seed == 2
    assert s.name == "t"
    with pytest.raises(SweepError, match=r"variants.grid.data.shapes: \{grid: \[...\]\} with some of the sweep's"):
        sweep(scale=[20, 50], variants={"grid": {"data.shapes": {"grid": [30]}}})
    with pytest.raises(SweepError, match=r"variants.grid.diffusion.seed: .* some of the sweep's seeds \[0\]"):
        sweep(seeds=[0], variants={"grid": {"diffusion.seed": 3}})


def test_a_sweep_without_axes_is_the_base_run_and_overrides_apply_to_every_trial():
    s = sweep(overrides=["fit.steps=50"], seeds=[3])
    assert [t.name for t in s.trials] == ["seed=3"]
    assert s.trials[0].config.fit.steps == 50 and s.trials[0].config.base.shapes == 0
    assert s.max_concurrent_trials == 1 and s.trial_resources == {"cpu": 0.5, "gpu": 0.0}


def test_load_sweep_resolves_the_base_beside_the_file(tmp_path):
    (tmp_path / "run.yaml").write_text("fit:\n  steps: 7\n")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"base": "run.yaml", "scale": [5]}))
    s = load_sweep(tmp_path / "s.yaml")
    assert s.name == "s" and s.trials[0].config.fit.steps == 7 and s.trials[0].config.data.shapes == 5
    # command-line overrides (`raywsl sweep -c s.yaml key=value`) apply to every trial, after the file's
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"base": "run.yaml", "scale": [5, 9],
                                                     "overrides": ["fit.steps=8", "train.steps=3"]}))
    s = load_sweep(tmp_path / "s.yaml", ["fit.steps=9", "cache.dir=s3://bucket/cache"])
    assert [(t.config.fit.steps, t.config.train.steps, t.config.cache_dir) for t in s.trials] == \
        [(9, 3, "s3://bucket/cache")] * 2


@pytest.mark.parametrize("raw,message", [
    ({"scale": [50, 20]}, r"scale: positive numbers of training shapes in increasing order"),
    ({"scale": [0, 5]}, r"scale: positive"),
    ({"space": {"train.lr": {"loguniform": [0, 1e-3]}}}, r"space.train.lr.loguniform: low must be > 0"),
    ({"space": {"train.lr": {"uniform": [1e-3, 1e-4]}}}, r"low < high"),
    ({"space": {"train.lr": {"between": [1, 2]}}}, r"space.train.lr: one of \{grid"),
    ({"space": {"field.rank": {"grid": [4, 4]}}}, r"values repeat"),
    ({"space": {"train.lrr": {"grid": [1e-3]}}},
     r"trial lrr=0.001: unknown config key 'train.lrr' \(did you mean 'train.lr'\?\)"),
    ({"space": {"field.type": {"grid": ["siren"]}}}, r"trial type=siren: .*field.type"),
    ({"space": {"data.shapes": {"grid": [5]}}, "scale": [5]}, r"data.shapes is set by `scale`"),
    ({"variants": {"a": {}}}, r"variants: a mapping of names to non-empty mappings"),
    ({"seeds": [1, 1]}, r"seeds: values repeat"),
    ({"variants": {"a": {"field.kappa": {"uniform": [1, 2]}}}},
     r"variants.a.field.kappa: a variant's own axes are grids"),
    ({"variants": {"a": {"field.rank": {"grid": []}}}}, r"variants.a: space.field.rank.grid: a non-empty list"),
    ({"samples": 0}, r"samples: a positive integer"),
    ({"trial_resources": {"tpu": 1}}, r"trial_resources"),
    ({"trial_resources": {"cpu": 0}}, r"trial_resources.cpu: more than 0"),
    ({"asha": {"metric": "loss", "grace": 3}}, r"asha: a mapping with keys among"),
    ({"asha": {"reduction_factor": 1}}, r"asha.reduction_factor: at least 2"),
    ({"overrides": ["fit.steps"]}, r"overrides: a list of key=value strings"),
    ({"spaces": {}}, r"unknown keys \['spaces'\]"),
    ({"base": "nowhere.yaml"}, r"base: run config 'nowhere.yaml' does not exist"),
])
def test_bad_sweeps_are_clear_errors(raw, message):
    with pytest.raises(SweepError, match=message):
        parse_sweep({"name": "t", "base": BASE, **raw}, where="s.yaml")


def test_trial_names_are_short_and_readable():
    assert trial_name({"data.shapes": 100, "variant": "lora", "train.lr": 0.000123456, "seed": 2}) == \
        "N=100,lora,lr=0.000123,seed=2"
    assert trial_name({}) == "trial"


# ------------------------------------------------------------------------------------ onset

def curves(attractor, memorised, valid, seeds=3, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    def per_seed(means):
        return [list(np.clip(m + noise * rng.standard_normal(seeds), 0, 1)) for m in means]
    return {"weights_attractor_share": per_seed(attractor), "memorisation_rate": per_seed(memorised),
            "valid_share": per_seed(valid)}


def test_onset_is_the_first_scale_from_which_every_rule_keeps_holding():
    scales = [20, 50, 100, 200, 500]
    # attractors fall below 0.5 at 100, memorisation below 0.5 at 200, validity always fine
    values = curves([0.9, 0.7, 0.4, 0.2, 0.1], [0.9, 0.8, 0.6, 0.3, 0.1], [0.9] * 5)
    result = estimate_onset(scales, values, bootstrap=200)
    assert result["onset"] == 200 and result["low"] == result["high"] == 200 and result["found_share"] == 1.0
    assert result["means"]["memorisation_rate"] == pytest.approx([0.9, 0.8, 0.6, 0.3, 0.1])
    # no onset: the last scale fails a rule; a dip back above the threshold moves the onset past it
    assert estimate_onset(scales, curves([0.9] * 5, [0.1] * 5, [0.9] * 5), bootstrap=10)["onset"] is None
    dip = curves([0.1, 0.1, 0.9, 0.1, 0.1], [0.1] * 5, [0.9] * 5)
    assert estimate_onset(scales, dip, bootstrap=10)["onset"] == 200


def test_onset_interval_widens_with_seed_noise_near_the_threshold():
    scales = [20, 50, 100, 200, 500, 1000]
    values = curves([0.9, 0.8, 0.55, 0.45, 0.3, 0.1], [0.1] * 6, [0.95] * 6, seeds=5, noise=0.15, seed=1)
    result = estimate_onset(scales, values, bootstrap=500, seed=0)
    assert result["onset"] in (100, 200, 500)
    assert result["low"] <= result["onset"] <= result["high"] and result["low"] < result["high"]
    assert 0.5 < result["found_share"] <= 1.0
    assert estimate_onset(scales, values, bootstrap=500, seed=0) == result  # seeded


def test_onset_rules_and_errors():
    assert onset_index({"m": np.array([0.2, 0.1])}, [Rule("m", "<=", 0.5)]) == 0
    assert not Rule("m", ">=", 0.5).holds(math.nan)
    with pytest.raises(ValueError, match="scales must increase"):
        estimate_onset([50, 20], curves([0.1] * 2, [0.1] * 2, [0.9] * 2))
    with pytest.raises(ValueError, match=r"no values of \['valid_share'\]"):
        estimate_onset([20], {"weights_attractor_share": [[0.1]], "memorisation_rate": [[0.1]]})


def test_unreadable_sweep_files_are_clear_errors(tmp_path):
    with pytest.raises(SweepError, match=r"sweep config '.*nowhere.yaml' does not exist"):
        load_sweep(tmp_path / "nowhere.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SweepError, match=r"sweep config '.*list.yaml' must hold a mapping of keys, got list"):
        load_sweep(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    with pytest.raises(SweepError, match=r"sweep config '.*bad.yaml' is not valid YAML"):
        load_sweep(tmp_path / "bad.yaml")
