"""The whole chain on the built-in demo corpus, each stage writing runs/demo/<job>/.

    python jobs/demo.py

Stages (each is also its own job, run with the same config): make_demo_corpus ->
extract_embeddings -> train_decoder -> score_matrix -> caption -> perturb. One embedded
local Ray serves every stage (4 logical CPUs on 2 cores: Ray Train's two workers hold one
each, Ray Data's read tasks need the rest).
"""

import sys

from aacray.demo import run_demo

if __name__ == "__main__":
    sys.exit(run_demo(sys.argv[1:]))
