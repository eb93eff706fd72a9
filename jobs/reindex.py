"""Add new captions and/or audios to a score_matrix output, scoring only the new pairs.

Local:   python jobs/reindex.py configs/reindex_demo.yaml
Cluster: ray job submit --submission-id "$(python -m aacray.reindex --submission-id configs/reindex_demo.yaml)" \
           --working-dir . -- python jobs/reindex.py configs/reindex_demo.yaml
Safe to rerun: the same inputs change nothing. See docs/reindex.md.
"""

import sys

from aacray.cli import run_job
from aacray.config import ReindexConfig
from aacray.reindex import run_reindex

if __name__ == "__main__":
    sys.exit(run_job(ReindexConfig, run_reindex, sys.argv[1:]))
