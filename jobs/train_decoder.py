"""Fit the CNext-trans projection + decoder on Ray Train from embedding Parquet.

Local:   python jobs/train_decoder.py configs/train_demo.yaml
Cluster: ray job submit --working-dir . -- python jobs/train_decoder.py configs/train_demo.yaml num_workers=4 use_gpu=true
Resume:  run the same command again with the same output: it continues from the newest
         complete checkpoint under OUTPUT/ray_train/ and logs which. It refuses (exit 2)
         when that checkpoint was trained with another model, vocabulary or recipe, or
         when no checkpoint there is complete; add restart=true to remove them and train
         from epoch 1.
"""

import sys

from aacray.cli import run_job
from aacray.config import TrainConfig
from aacray.train import run_train

if __name__ == "__main__":
    sys.exit(run_job(TrainConfig, run_train, sys.argv[1:]))
