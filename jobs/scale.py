"""The scale study as a Ray job: `raywsl sweep -c configs/sweeps/scale_study.yaml` unless `-c` names
another sweep config (e.g. the laptop-sized one, to try the cluster cheaply first).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/scale.py --dir s3://YOUR-BUCKET/sweeps/scale_study
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/scale.py -c configs/sweeps/scale_study_small.yaml --dir s3://YOUR-BUCKET/sweeps/small

Other arguments are those of `raywsl sweep` (`python jobs/scale.py --help`). Expected cost and time:
docs/scaling.md (the study is ~890 GPU-hours as estimated in configs/sweeps/scale_study.yaml).
"""

import os
import sys

# The repository root goes first on sys.path, so the uploaded working dir's raywsl is the one that
# runs, never an older copy installed on the node (see jobs/run.py).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from raywsl.cli import main  # noqa: E402  (after the sys.path line above, on purpose)

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "sweeps", "scale_study.yaml")


def sweep_args(argv: list[str]) -> list[str]:
    """`raywsl sweep` arguments: argv, with `-c DEFAULT_CONFIG` first unless argv names a config
    (`-c X`, `-cX`, `--config X` or `--config=X`)."""
    named = any(a == "--config" or a.startswith("--config=") or (a.startswith("-c") and not a.startswith("--"))
                for a in argv)
    return ["sweep", *argv] if named else ["sweep", "-c", DEFAULT_CONFIG, *argv]


if __name__ == "__main__":
    sys.exit(main(sweep_args(sys.argv[1:])))
