"""Ray Job entrypoint for the batch job; the same arguments and exit codes as `wan-ray generate`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/generate.py s3://bucket/manifest.parquet --output s3://bucket/videos/ --topology 8xh100

Inside a Ray Job it joins the job's cluster (RAY_ADDRESS); run by hand without `--address`, it starts a
local Ray.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package, when run from a checkout

from wan_ray.batch.command import main

if __name__ == "__main__":
    sys.exit(main())
