"""`raywsl sweep` as a Ray job: every trial of a sweep config on Ray Tune, then the phase diagram.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/sweep.py -c configs/sweeps/NAME.yaml --dir s3://YOUR-BUCKET/sweeps/NAME

The arguments are those of `raywsl sweep` (`python jobs/sweep.py --help`). On a cluster the sweep's
base config (or its `overrides:` list) must name shared storage and the head's MLflow server:
`cache.dir=s3://YOUR-BUCKET/cache` and `mlflow.tracking_uri=http://HEAD_PRIVATE_IP:5000` (see
docs/scaling.md and cluster.yaml). jobs/scale.py is this job with the scale study as its default.
"""

import os
import sys

# The repository root goes first on sys.path, so the uploaded working dir's raywsl is the one that
# runs, never an older copy installed on the node (see jobs/run.py).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raywsl.cli import main  # noqa: E402  (after the sys.path line above, on purpose)

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
