"""Add new captions and/or audios to a score_matrix output, scoring only the new pairs.

Local:   python jobs/reindex.py configs/reindex_demo.yaml
Run key: python jobs/reindex.py --submission-id configs/reindex_demo.yaml [k=v ...]
Cluster: ray job submit --submission-id "$(python jobs/reindex.py --submission-id configs/reindex_demo.yaml)" \
           --working-dir . -- python jobs/reindex.py configs/reindex_demo.yaml
Safe to rerun: the same inputs change nothing. See docs/reindex.md.
"""

import sys

from aacray.cli import run_job
from aacray.config import ReindexConfig, load_config
from aacray.reindex import run_reindex, submission_id


def main(argv: list[str]) -> int:
    if argv[:1] == ["--submission-id"]:  # the run key, printed alone (for --submission-id "$(...)")
        print(submission_id(load_config(ReindexConfig, argv[1:])))
        return 0
    return run_job(ReindexConfig, run_reindex, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
