"""Caption an embedding set by beam search; AAC metrics against the references (aac-metrics).

Local:   python jobs/caption.py configs/caption_demo.yaml
Cluster: ray job submit --working-dir . -- python jobs/caption.py configs/caption_demo.yaml
AudioCaps decoding (the authors'): python jobs/caption.py CONFIG.yaml beam_size=2 max_len=30
"""

import sys

from aacray.captioning import run_caption
from aacray.cli import run_job
from aacray.config import CaptionConfig

if __name__ == "__main__":
    sys.exit(run_job(CaptionConfig, run_caption, sys.argv[1:]))
