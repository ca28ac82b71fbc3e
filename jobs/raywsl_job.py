"""Entry point for `ray job submit`: runs one raywsl verb on the cluster the job is submitted to.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json '{"pip": ["-e ."]}' -- python jobs/raywsl_job.py ingest -c configs/X.yaml

Inside a job, RAY_ADDRESS is set, so raywsl connects to the cluster instead of starting a local Ray;
`run.dir` must then be storage every node can reach (s3://..., NFS).
"""

import sys

from raywsl.cli import main

if __name__ == "__main__":
    sys.exit(main())
