"""The topology probes' figures per parameterisation, as markdown for benchmarks/RESULTS.md.

    .venv/bin/python benchmarks/probes/table.py [runs/probes]     (after benchmarks/probes/topology.sh)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

NAMES = ("mlp", "mlora", "mlora-asym", "deepsdf_latent")


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def ci(x: dict) -> str:
    if not x or not x["n"]:
        return "none"
    return f"{x['mean']:.3f} [{x['lo']:.3f}, {x['hi']:.3f}]" if x["n"] > 1 else f"{x['mean']:.3f}"


def num(v, fmt: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/probes")
    print("Encoder (held-out shapes encoded and decoded, Chamfer median; mean training row; weight-space R^2):\n")
    print("| parameterisation | held-out CD | mean-row CD | training encoded / fitted CD | R^2 |")
    print("|---|---:|---:|---:|---:|")
    for name in NAMES:
        m = load(root / name / "metrics.json") or {}
        print(f"| {name} | {num(m.get('encoder_heldout_cd_median'), '.4f')} | "
              f"{num(m.get('encoder_mean_row_cd_median'), '.4f')} | {num(m.get('encoder_train_cd_median'), '.4f')} / "
              f"{num(m.get('encoder_fitted_cd_median'), '.4f')} | {num(m.get('encoder_r2_train'), '.3f')} |")

    print("\nPhase (α* and width: mean [95 % t interval] over seeds; components: mean count at α = 0 -> 1):\n")
    print("| parameterisation | path | components | α* | width | seeds with a transition | changes | genus α* |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name in NAMES:
        for space in ("cloud", "cloud-sigma1", "cloud-even-encoder", "cloud-even-encoder-sigma1", "weights"):
            s = load(root / name / "probe" / f"phase-{space}" / "summary.json")
            if not s:
                continue
            s["path"] += ", encoder trained on even samplings" if "even-encoder" in space else ""
            changes = sum(t["changes"] for t in s["seeds"]) / len(s["seeds"])
            print(f"| {name} | {s['space']}: {s['path'].split(': ', 1)[1]} | {s['start_components']['mean']:.1f} -> "
                  f"{s['end_components']['mean']:.1f} | {ci(s['alpha_star'])} | {ci(s['width'])} | "
                  f"{s['transition_share']:.0%} | {changes:.1f} | {ci(s['genus_alpha_star'])} |")

    print("\nSubspace (brackets; per radius at the largest m: valid / topology kept / nearest-training CD median / "
          "displaced share; 'set' = the set's own decoded shapes):\n")
    for name in NAMES:
        for space in ("weights", "condition"):
            s = load(root / name / "probe" / f"subspace-{space}" / "summary.json")
            if not s:
                continue
            table = s["table"]
            base = next(t for t in table if t["kind"] == "training")
            m = s["dims"][-1]
            cells = [f"set {base['kept_share']:.2f}"]
            for t in table:
                if t["kind"] == "sample" and t["m"] == m:
                    cells.append(f"r={t['radius']:g}: {num(t['valid_share'])} / {num(t['kept_share'])} / "
                                 f"{num(t['nearest_cd_median'], '.4f')} / {num(t['displaced_share'])}")
            by_m = ", ".join(f"m={t['m']} {num(t['kept_share'])}" for t in table
                             if t["kind"] == "sample" and t["radius"] == 1)
            path = next((t for t in table if t["kind"] == "path"), None)
            print(f"- {name}, {space} ({s['shapes']} shapes, modal (components, genus) = "
                  f"({s['modal_topology']['major_components']}, {s['modal_topology']['genus']}), top-{m} variance "
                  f"{sum(s['explained_variance']):.0%}): {'; '.join(cells)}; kept at r=1: {by_m}"
                  + (f"; paths kept {num(path['kept_share'])}" if path else ""))


if __name__ == "__main__":
    main()
