"""The tables of benchmarks/fit/field_types.sh from its run folders: reconstruction (metrics.json),
probes and weight statistics (probe/probe.json).
    python benchmarks/fit/field_types_row.py RUN NAME SECONDS    one reconstruction row
    python benchmarks/fit/field_types_row.py --header            its header
    python benchmarks/fit/field_types_row.py --probes WORK NAME...   the probe and statistics tables"""

import json
import os
import sys

if sys.argv[1] == "--header":
    print("| field | trainable params | recon CD median | IoU mean | fit loss median | fit+probe s |")
    print("|---|---:|---:|---:|---:|---:|")
elif sys.argv[1] == "--probes":
    work, names = sys.argv[2], sys.argv[3:]
    print("| field | 1-NN acc | logistic acc | k-means ARI | mean norm (std) | pairwise cos mean / min / max "
          "| top 10 / 1k / 10k dims |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        path = f"{work}/{name}/probe/probe.json"
        if not os.path.exists(path):
            print(f"| {name} | (no probe: see {work}/{name}.probe.log) |||||")
            continue
        d = json.load(open(path))
        p, s = d["probe"], d["statistics"]

        def pm(k):
            return f"{100 * p[k]:.1f} ± {100 * p[k + '_std']:.1f}%"

        print(f"| {name} | {pm('nn_accuracy')} | {pm('logistic_accuracy')} | {pm('kmeans_ari')} | "
              f"{s['norm_mean']:.2f} ({s['norm_std']:.2f}) | {s['cos_mean']:.3f} / {s['cos_min']:.3f} / "
              f"{s['cos_max']:.3f} | {100 * s['top10_dims_share']:.1f} / {100 * s['top1000_dims_share']:.1f} / "
              f"{100 * s['top10000_dims_share']:.1f}% |")
else:
    run, name, seconds = sys.argv[1:]
    m = json.load(open(f"{run}/metrics.json"))
    from raywsl.store.weights import open_weights

    params = open_weights(os.path.realpath(f"{run}/weights.zarr")).attrs["params"]
    print(f"| {name} | {params:,} | {m['recon_cd_median']:.5f} | {m['recon_iou_mean']:.3f} | "
          f"{m['fit_loss_median']:.4f} | {seconds} |")
