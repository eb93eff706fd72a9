"""The whole chain on the built-in demo corpus, each stage writing runs/demo/<job>/.

    python jobs/demo.py

Stages (each is also its own job, run with the same config): make_demo_corpus ->
extract_embeddings -> train_decoder -> score_matrix -> caption -> perturb, each on an
embedded local Ray started as its config says. Name stages to run only those:
    python jobs/demo.py train_decoder score_matrix
"""

import sys

from aacray.demo import run_demo

if __name__ == "__main__":
    sys.exit(run_demo(sys.argv[1:]))
