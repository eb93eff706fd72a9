"""Audio -> sharded frame-embedding Parquet + captions Parquet (Ray Data).

Local:   python jobs/extract_embeddings.py configs/extract_demo.yaml
Cluster: ray job submit --working-dir . -- python jobs/extract_embeddings.py configs/extract_demo.yaml
"""

import sys

from aacray.cli import run_job
from aacray.config import ExtractConfig
from aacray.extract import run_extract

if __name__ == "__main__":
    sys.exit(run_job(ExtractConfig, run_extract, sys.argv[1:]))
