"""Before-After, seq2sup, sup2seq and Invert tests: is a perturbed caption's loss on its own
audio higher than the original's? (paper section 5, Tables 4 and 5)

Local:   python jobs/perturb.py configs/perturb_demo.yaml
Cluster: ray job submit --working-dir . -- python jobs/perturb.py configs/perturb_demo.yaml
"""

import sys

from aacray.cli import run_job
from aacray.config import PerturbConfig
from aacray.perturb import run_perturb

if __name__ == "__main__":
    sys.exit(run_job(PerturbConfig, run_perturb, sys.argv[1:]))
