"""Fit the CNext-trans projection + decoder on Ray Train from embedding Parquet.

Local:   python jobs/train_decoder.py configs/train_demo.yaml
Cluster: ray job submit --working-dir . -- python jobs/train_decoder.py configs/train_demo.yaml num_workers=4 use_gpu=true
Resume:  run the same command again with the same output: it continues from the latest checkpoint.
"""

import sys

from aacray.cli import run_job
from aacray.config import TrainConfig
from aacray.train import run_train

if __name__ == "__main__":
    sys.exit(run_job(TrainConfig, run_train, sys.argv[1:]))
