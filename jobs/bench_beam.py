"""Beam search: this checkout's `decoding.beam_search` against another checkout's, on the same
checkpoint and clips, interleaved round by round in one process (docs/benchmarks.md).

    git worktree add /tmp/before <rev> && python jobs/bench_beam.py /tmp/before

Defaults: the demo (runs/demo, made by jobs/demo.py), its 80 evaluation clips in batches of
16 as the caption job's actors take them, caption_demo.yaml's search (beam 3, 3 to 20 words,
no repeated content word), one thread. Prints each round's seconds, their ratio, and how
many captions came out the same (tokens) with the largest score difference.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import torch

from aacray import checkpoint as ckpt_lib
from aacray import machine
from aacray.decoder import pad_frames
from aacray.decoding import beam_search
from aacray.embeddings import read_embeddings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("baseline", help="another checkout's root: its aacray/decoding.py is the baseline")
    ap.add_argument("--checkpoint", default="runs/demo/train_decoder")
    ap.add_argument("--embeddings", default="runs/demo/extract_embeddings")
    ap.add_argument("--subsets", nargs="+", default=["evaluation"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = os.path.join(args.baseline, "aacray", "decoding.py")
    spec = importlib.util.spec_from_file_location("baseline_decoding", path)
    baseline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(baseline)
    model, tok, _ = ckpt_lib.load(args.checkpoint)
    emb = read_embeddings(args.embeddings, args.subsets)
    batches = [pad_frames(emb.frames[i : i + args.batch]) for i in range(0, len(emb.frames), args.batch)]
    kw = dict(beam_size=3, min_len=3, max_len=20, forbid_repeats=True)
    print(machine.describe(), f"\n{len(emb.frames)} clips, batches of {args.batch}; baseline {path}", flush=True)
    times: dict[str, list[float]] = {"baseline": [], "this": []}
    for r in range(args.rounds):
        outs = {}
        for name, search in (("baseline", baseline.beam_search), ("this", beam_search)):
            t = time.perf_counter()
            outs[name] = [g for f, m in batches for g in search(model, f, m, tok, **kw)]
            times[name].append(time.perf_counter() - t)
        pairs = list(zip(outs["baseline"], outs["this"], strict=True))
        same = sum(a.tokens == b.tokens for a, b in pairs)
        err = max(abs(a.score - b.score) for a, b in pairs)
        print(f"round {r}: baseline {times['baseline'][-1]:.2f} s, this {times['this'][-1]:.2f} s, "
              f"x{times['baseline'][-1] / times['this'][-1]:.2f}; same captions {same}/{len(pairs)}, "
              f"largest |score difference| {err:.1e}", flush=True)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(f"median: baseline {med['baseline']:.2f} s, this {med['this']:.2f} s: x{med['baseline'] / med['this']:.2f} "
          f"({len(emb.frames) / med['this']:.1f} clips/s)")


if __name__ == "__main__":
    main()
