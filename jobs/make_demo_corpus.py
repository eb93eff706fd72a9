"""Write the built-in synthetic demo corpus in the Clotho v2.1 layout.

Local:   python jobs/make_demo_corpus.py configs/demo_corpus.yaml
"""

import sys

from aacray.cli import run_job
from aacray.config import DemoCorpusConfig
from aacray.corpora import run_make_demo_corpus

if __name__ == "__main__":
    sys.exit(run_job(DemoCorpusConfig, run_make_demo_corpus, sys.argv[1:]))
