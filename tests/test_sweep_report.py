"""The sweep report from a synthetic sweep folder (no Ray, no MLflow): tables, figures, the onset."""

import csv
import json

from raywsl.sweep.report import collect, write_sweep_report
from raywsl.sweep.space import SCALE_KEY, SEED_KEY, trial_name

PNG = b"\x89PNG\r\n\x1a\n"
GRID = [(rank, kappa) for rank in (4, 8) for kappa in (2.0, 6.0)]


def metrics(works: bool, seed: int, rank: int = 0) -> dict:
    """Collapse signals under the onset rules' thresholds when `works`, well above them otherwise."""
    noise = 0.01 * seed
    return {"weights_attractor_share": (0.2 if works else 0.9 - 0.02 * rank) + noise,
            "memorisation_rate": (0.1 if works else 0.8) + noise, "valid_share": 0.95 - noise,
            "1nna_cd": 0.6 + 0.01 * rank + noise, "cov_cd": 0.4 - noise, "mmd_cd": 0.01,
            "novelty_cd_median": 0.02, "weights_distinct_nearest": 7,
            "weights_probe": {"nested": 1.0}, "stage_seconds": [1.0, 2.0], "weights_probe_skipped": "no labels"}


def make_sweep(root, trials, scale=(), seeds=(0, 1, 2), variants=None, axes=(), run_root=None):
    """sweep.json and each trial's trial.json / metrics.json as the sweep runner writes them.
    `trials`: (params, status or None (not started), metrics or None)."""
    records = []
    for params, status, values in trials:
        name = trial_name(params)
        folder = root / "trials" / name
        folder.mkdir(parents=True)
        if status is not None:
            state = {"status": status, "attempts": 1, "seconds": 12.5,
                     "error": "Traceback ...\nRuntimeError: out of memory\n" if status == "failed" else ""}
            (folder / "trial.json").write_text(json.dumps(state))
        if values is not None:
            (folder / "metrics.json").write_text(json.dumps(values))
        records.append({"name": name, "params": params, "run_dir": str((run_root or root / "trials") / name)})
    meta = {"name": "scale_study", "base": "configs/quickstart.yaml", "dir": str(root), "scale": list(scale),
            "variants": variants or {}, "seeds": list(seeds), "axes": list(axes),
            "mlflow": {"tracking_uri": str(root / "mlruns"), "experiment": "scale_study", "parent_run_id": "abc"},
            "trials": records}
    (root / "sweep.json").write_text(json.dumps(meta))
    return meta


VARIANTS = {"mlp-warm": {"field.type": "mlp", "fit.init": "warm"},
            "mlora-asym": {"field.type": "mlora", "field.rank": {"grid": [4, 8]}, "field.kappa": {"grid": [2.0, 6.0]}}}


def test_report_of_a_scale_sweep_finds_the_onset_and_draws_the_phase_diagram(tmp_path):
    scales = (20, 50, 100, 200)
    failed = {SCALE_KEY: 200, "variant": "mlora-asym", "field.rank": 8, "field.kappa": 6.0, SEED_KEY: 2}
    pending = {SCALE_KEY: 200, "variant": "mlora-asym", "field.rank": 8, "field.kappa": 6.0, SEED_KEY: 1}
    trials = []
    for n in scales:
        for seed in (0, 1, 2):
            trials.append(({SCALE_KEY: n, "variant": "mlp-warm", SEED_KEY: seed}, "finished", metrics(n >= 100, seed)))
        for rank, kappa in GRID:
            for seed in (0, 1, 2):
                params = {SCALE_KEY: n, "variant": "mlora-asym", "field.rank": rank, "field.kappa": kappa,
                          SEED_KEY: seed}
                if params == failed:  # a stale metrics.json from an earlier attempt must not count
                    trials.append((params, "failed", metrics(True, seed, rank)))
                elif params == pending:
                    trials.append((params, None, None))
                else:
                    trials.append((params, "finished", metrics(False, seed, rank)))
    make_sweep(tmp_path, trials, scale=scales, variants=VARIANTS)

    meta, rows = collect(tmp_path)
    assert meta["name"] == "scale_study" and len(rows) == len(trials) - 2
    assert trial_name(failed) not in {r["trial"] for r in rows}
    first = rows[0]
    assert first["variant"] == "mlp-warm" and first["weights_attractor_share"] == 0.9
    assert "weights_probe" not in first and "stage_seconds" not in first and "weights_probe_skipped" not in first

    report = write_sweep_report(tmp_path, bootstrap=200)
    out = tmp_path / "report"

    onset = json.loads((out / "onset.json").read_text())
    warm = onset["onset"]["mlp-warm"]
    assert warm["onset"] == 100 and warm["low"] <= 100 <= warm["high"] and warm["found_share"] > 0.9
    grid_labels = [f"mlora-asym, field.rank={r}, field.kappa={k:.3g}" for r, k in GRID]
    assert set(onset["onset"]) == {"mlp-warm", *grid_labels}
    assert all(onset["onset"][label]["onset"] is None for label in grid_labels)
    assert report.onset["mlp-warm"]["onset"] == 100

    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(trials) and report.table == str(out / "results.csv")
    by_name = {r["trial"]: r for r in table}
    assert by_name[trial_name(failed)]["status"] == "failed"
    assert by_name[trial_name(failed)]["weights_attractor_share"] == ""  # not read, not plotted
    assert by_name[trial_name(pending)]["status"] == "pending"
    assert by_name[trial_name(trials[0][0])]["memorisation_rate"] == "0.8"
    assert by_name[trial_name(trials[0][0])]["field.rank"] == ""

    names = sorted(p.rsplit("/", 1)[-1] for p in report.figures)
    assert names == sorted(["curves.png"] + [f"heatmap_mlora-asym_N{n}.png" for n in scales])
    for path in report.figures:
        data = open(path, "rb").read()
        assert data.startswith(PNG) and len(data) > 10_000, path

    page = (out / "report.html").read_text()
    assert report.path == str(out / "report.html")
    assert "<td>mlp-warm</td><td>100</td><td>[100, 100]</td>" in page
    assert all(f"<td>{label}</td><td>none</td><td>&ndash;</td><td>0%</td>" in page for label in grid_labels)
    assert "weights_attractor_share &lt;= 0.5" in page
    assert f"mlflow ui --backend-store-uri {tmp_path / 'mlruns'}" in page
    assert "failed: RuntimeError: out of memory" in page and "1 failed" in page and "1 pending" in page
    assert page.count("data:image/png;base64,") == len(report.figures)


def test_without_a_scale_axis_the_table_and_heatmaps_are_written_and_curves_and_onset_skipped(tmp_path):
    trials = [({"variant": "mlora-asym", "field.rank": rank, "field.kappa": kappa, SEED_KEY: 0}, "finished",
               metrics(False, 0, rank)) for rank, kappa in GRID]
    trials.append(({"variant": "mlora-asym", "field.rank": 8, "field.kappa": 6.0, SEED_KEY: 1}, "running", None))
    make_sweep(tmp_path, trials, seeds=(0, 1), variants={"mlora-asym": VARIANTS["mlora-asym"]})

    report = write_sweep_report(tmp_path, bootstrap=50)
    out = tmp_path / "report"
    assert not (out / "curves.png").exists() and report.onset == {}
    assert [p.rsplit("/", 1)[-1] for p in report.figures] == ["heatmap_mlora-asym.png"]
    assert (out / "heatmap_mlora-asym.png").read_bytes().startswith(PNG)
    assert json.loads((out / "onset.json").read_text())["skipped"] == {
        "all": "the onset needs at least two scales (this sweep has 0)"}
    with open(out / "results.csv", newline="") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["finished"] * 4 + ["running"]
    page = (out / "report.html").read_text()
    assert "no scale axis" in page and "at least two scales" in page and "4 finished, 1 running" in page


def test_one_seed_gives_a_point_interval_and_a_copied_folder_is_still_read(tmp_path):
    trials = [({SCALE_KEY: n, SEED_KEY: 0}, "finished", metrics(n >= 50, 0)) for n in (20, 50)]
    make_sweep(tmp_path, trials, scale=(20, 50), seeds=(0,), run_root=tmp_path / "gone" / "trials")

    from raywsl.cli import main

    assert main(["report", str(tmp_path)]) == 0  # `raywsl report SWEEP_DIR`: the same page again
    assert (tmp_path / "report" / "report.html").exists()
    report = write_sweep_report(tmp_path, bootstrap=50)
    assert report.onset["all trials"] | {"means": None} == {
        "onset": 50, "low": 50, "high": 50, "found_share": 1.0, "means": None,
        "rules": ["weights_attractor_share <= 0.5", "memorisation_rate <= 0.5", "valid_share >= 0.8"]}
    assert [p.rsplit("/", 1)[-1] for p in report.figures] == ["curves.png"]


def test_report_refuses_a_folder_that_is_neither_a_sweep_nor_a_run(tmp_path, capsys):
    from raywsl.cli import main

    assert main(["report", str(tmp_path)]) == 2
    assert "neither a sweep folder (no sweep.json) nor a run folder (no config.yaml)" in capsys.readouterr().err


def test_a_parameterisation_missing_a_scale_is_not_given_an_onset(tmp_path):
    trials = [({SCALE_KEY: n, "variant": v, SEED_KEY: 0}, "finished" if (v, n) != ("b", 50) else "failed",
               metrics(True, 0)) for n in (20, 50) for v in ("a", "b")]
    make_sweep(tmp_path, trials, scale=(20, 50), seeds=(0,), variants={"a": {"fit.init": "warm"},
                                                                         "b": {"fit.init": "cold"}})

    report = write_sweep_report(tmp_path, bootstrap=20)
    assert report.onset["a"]["onset"] == 20 and "b" not in report.onset
    assert json.loads((tmp_path / "report" / "onset.json").read_text())["skipped"] == {
        "b": "no finished trial at N=50"}
    assert "b (no finished trial at N=50)" in (tmp_path / "report" / "report.html").read_text()


def test_report_of_a_sweep_folder_at_a_url(tmp_path):
    """A sweep folder on object storage (a cluster's s3://...): read and written through fsspec, with
    the same onset as the same folder on a local disk."""
    import fsspec

    scales = (20, 50, 100)
    trials = [({SCALE_KEY: n, "variant": "mlp-warm", SEED_KEY: s}, "finished", metrics(n >= 50, s))
              for n in scales for s in (0, 1)]
    meta = make_sweep(tmp_path, trials, scale=scales, seeds=(0, 1))
    local = write_sweep_report(tmp_path, bootstrap=50)
    fs = fsspec.filesystem("memory")
    url = "memory://sweep-report-test"
    for record in meta["trials"]:  # the trials' run folders at the URL too
        record["run_dir"] = f"{url}/trials/{record['name']}"
    (tmp_path / "sweep.json").write_text(json.dumps(meta))
    fs.put(str(tmp_path / "trials"), "/sweep-report-test/trials", recursive=True)
    fs.pipe_file("/sweep-report-test/sweep.json", (tmp_path / "sweep.json").read_bytes())
    try:
        report = write_sweep_report(url, bootstrap=50)
        assert report.path == f"{url}/report/report.html" and fs.exists("/sweep-report-test/report/curves.png")
        onset = json.loads(fs.cat_file("/sweep-report-test/report/onset.json"))
        assert onset["onset"] == json.loads((tmp_path / "report" / "onset.json").read_text())["onset"]
        assert onset["onset"]["mlp-warm"]["onset"] == 50 and local.onset["mlp-warm"]["onset"] == 50
        assert fs.cat_file("/sweep-report-test/report/report.html").count(b"data:image/png;base64,") == 1
        rows = list(csv.DictReader(fs.cat_file("/sweep-report-test/report/results.csv").decode().splitlines()))
        assert len(rows) == len(trials) and {r["status"] for r in rows} == {"finished"}
    finally:
        fs.rm("/sweep-report-test", recursive=True)
