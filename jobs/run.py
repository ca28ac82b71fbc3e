"""`raywsl run` as a Ray job: every stage of one config, meshes to report.html, on the cluster.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/run.py -c configs/hyperdiffusion.yaml \
            run.dir=s3://YOUR-BUCKET/runs/hd100k cache.dir=s3://YOUR-BUCKET/cache \
            mlflow.tracking_uri=http://HEAD_PRIVATE_IP:5000 data.source=s3://YOUR-BUCKET/meshes/manifest.csv

The arguments are those of `raywsl run` (`python jobs/run.py --help` lists every config key); the
same config runs on a laptop with `raywsl run -c ...`. Inside a job RAY_ADDRESS is set, so raywsl
joins the cluster instead of starting a local Ray. See cluster.yaml for the whole workflow.
"""

import os
import sys

# The repository root (this file's parent's parent) goes first on sys.path, so the raywsl of the
# uploaded working dir is the one that runs, never an older copy installed on the node (cluster.yaml
# pip-installs the repo as it was at `ray up`; that editable install is only a fallback for imports).
# Ray Jobs also put the working dir first on PYTHONPATH for the job's workers.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raywsl.cli import main  # noqa: E402  (after the sys.path line above, on purpose)

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
