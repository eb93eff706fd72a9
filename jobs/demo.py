"""The whole chain on the built-in demo corpus, each stage writing runs/demo/<job>/.

    python jobs/demo.py

Stages (each is also its own job, run with the same config): make_demo_corpus ->
extract_embeddings -> train_decoder -> score_matrix -> caption -> perturb, each on an
embedded local Ray started as its config says. Name stages to run only those:
    python jobs/demo.py train_decoder score_matrix
A small chain elsewhere: --root moves every runs/demo path, STAGE.key=value sets a key:
    python jobs/demo.py --root /tmp/d make_demo_corpus.n_dev=24 train_decoder.epochs=3
It ends with a one-screen summary (every figure: <root>/demo_summary.json).
"""

import sys

from aacray.demo import run_demo

if __name__ == "__main__":
    sys.exit(run_demo(sys.argv[1:]))
