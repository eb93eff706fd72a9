"""Score every audio x caption pair with a trained decoder; rank both ways; Recall@k.

Local:   python jobs/score_matrix.py configs/score_demo.yaml
Cluster: ray job submit --working-dir . -- python jobs/score_matrix.py configs/score_demo.yaml
"""

import sys

from aacray.cli import run_job
from aacray.config import ScoreConfig
from aacray.scoring import run_score_matrix

if __name__ == "__main__":
    sys.exit(run_job(ScoreConfig, run_score_matrix, sys.argv[1:]))
