"""The demo chain: every job with its configs/*_demo.yaml, in order, each on its own local Ray."""

from __future__ import annotations

import json
import time

from aacray.config import load_config
from aacray.runtime import setup_logging


def _stages():
    from aacray.captioning import run_caption
    from aacray.config import (
        CaptionConfig,
        DemoCorpusConfig,
        ExtractConfig,
        PerturbConfig,
        ScoreConfig,
        TrainConfig,
    )
    from aacray.corpora import run_make_demo_corpus
    from aacray.extract import run_extract
    from aacray.perturb import run_perturb
    from aacray.scoring import run_score_matrix
    from aacray.train import run_train

    return [
        ("make_demo_corpus", DemoCorpusConfig, run_make_demo_corpus, "configs/demo_corpus.yaml"),
        ("extract_embeddings", ExtractConfig, run_extract, "configs/extract_demo.yaml"),
        ("train_decoder", TrainConfig, run_train, "configs/train_demo.yaml"),
        ("score_matrix", ScoreConfig, run_score_matrix, "configs/score_demo.yaml"),
        ("caption", CaptionConfig, run_caption, "configs/caption_demo.yaml"),
        ("perturb", PerturbConfig, run_perturb, "configs/perturb_demo.yaml"),
    ]


def run_demo(argv: list[str]) -> int:
    setup_logging()
    import ray

    only = set(argv)
    times = {}
    t_all = time.time()
    for name, cls, fn, path in _stages():
        if only and name not in only:
            continue
        print(f"\n===== {name}: python jobs/{name}.py {path} =====", flush=True)
        t0 = time.time()
        try:
            result = fn(load_config(cls, [path]))
        finally:
            # each stage starts the Ray its config asks for; a finished stage's actor pools
            # must not keep CPUs that the next stage (Ray Train's workers) waits on
            ray.shutdown()
        times[name] = round(time.time() - t0, 1)
        print(json.dumps(result, indent=2, default=str), flush=True)
    print("\n===== demo wall time per stage (s) =====")
    for name, s in times.items():
        print(f"  {name:20s} {s:8.1f}")
    print(f"  {'total':20s} {time.time() - t_all:8.1f}")
    print("outputs under runs/demo/")
    return 0
