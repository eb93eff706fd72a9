"""Measure what the min-max tie rule changes (ScoreConfig.minmax_ties, docs/operations.md 7).

    python jobs/bench_tie_rule.py [--audios 300] [--per-audio 5] [--decimals 1] [--seeds 0,1,2]

A synthetic Clotho-like index: N audios with `per-audio` captions each (300 x 1500 by
default), losses = 4 + a caption bias + noise - 1 on the ground-truth pairs, rounded to
`decimals` so that ties are common. Per seed: how many audio queries have 3 or more captions
tied at their smallest min-max score, how many get another top-1 caption under the authors'
rule than under the paper's, and min-max A2T R@1 / mAP@10 under each.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from aacray.retrieval import authors_tie_order, minmax_scale, retrieval_metrics, score_block


def synthetic(n: int, per_audio: int, decimals: int, seed: int):
    """(L (N, M), audio ids, caption ids, caption -> audio) with rounded, tie-rich losses."""
    rng = np.random.default_rng(seed)
    audios = [f"a{i:05d}" for i in range(n)]
    captions = [f"{a}#{j}" for a in audios for j in range(per_audio)]
    L = 4.0 + rng.normal(0, 0.5, (1, len(captions))) + rng.normal(0, 0.6, (n, len(captions)))
    L[np.repeat(np.arange(n), per_audio), np.arange(len(captions))] -= 1.0
    L = np.round(np.clip(L, 0.1, None), decimals)
    return L, audios, captions, {c: c.split("#")[0] for c in captions}


def measure(n: int, per_audio: int, decimals: int, seed: int) -> dict:
    L, audios, captions, gt = synthetic(n, per_audio, decimals, seed)
    paper = score_block(L, audios, captions, 10)
    authors = authors_tie_order(score_block(L, audios, captions, 10, "authors").a2t_minmax, 10)
    top_p = {q: v[0] for q, v in paper.a2t_minmax.lists().items()}
    top_a = {q: v[0] for q, v in authors.lists().items()}
    S = minmax_scale(L, L.min(0), L.max(0))
    tied = (S == S.min(axis=1, keepdims=True)).sum(axis=1)
    rules = {"paper": paper.a2t_minmax, "authors": authors}
    metrics = {r: retrieval_metrics(paper.t2a, paper.a2t_raw, t, gt)["a2t_minmax"] for r, t in rules.items()}
    return {
        "seed": seed, "audios": n, "captions": len(captions),
        "audios_with_3plus_min_ties": int((tied >= 3).sum()),
        "top1_differs": sum(top_p[a] != top_a[a] for a in audios),
        **{f"R@1_{r}": round(m["R@1"], 3) for r, m in metrics.items()},
        **{f"mAP@10_{r}": round(m["mAP@10"], 3) for r, m in metrics.items()},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--audios", type=int, default=300)
    ap.add_argument("--per-audio", type=int, default=5)
    ap.add_argument("--decimals", type=int, default=1)
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args(argv)
    for seed in (int(s) for s in args.seeds.split(",")):
        print(json.dumps(measure(args.audios, args.per_audio, args.decimals, seed)), flush=True)


if __name__ == "__main__":
    main()
