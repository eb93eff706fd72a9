"""Benchmark pair scoring: a naive per-pair forward against `PairScorer` (docs/benchmarks.md).

CPU (paper-size model, random weights):   python jobs/bench_scoring.py
+ top-10 rankings fp32 vs bf16, demo:     python jobs/bench_scoring.py --demo-ranks
+ in-process scorer vs Ray score_matrix:  python jobs/bench_scoring.py --only ray \
      --ray-set 'audio_subsets=[development,validation,evaluation]'   (420 x 400 demo pairs)
  (--ray-cpu: where the job's CPU went, by process role, in start-up, scoring and wind-down;
  jobs/bench_ray_floor.py: what Ray itself takes while the same pool's units sleep)
+ kept/discarded variants of the scorer:  python jobs/bench_scoring.py --ablations [TEXT]
  (TEXT: only the variants whose row name contains it; built from public arguments only:
  PairScorer's cpu_rows, pack_weights, fused_attention, one-thread streams as CPU actors run,
  `torch.compile` of its per-pair forward, and `pair_loss_memory` for the module-per-caption
  path the scorer replaced; bf16 variants only with --precision bf16, the default)
+ score_matrix end to end on a synthetic index of --audios x --captions:  --only job
  (random paper-size checkpoint; on CUDA one actor on one GPU)
A CPU without bf16 matrix units (no AMX, no avx512_bf16: the machine line says) emulates bf16
at ~1% of fp32's rate: use --precision fp32 there.
GPU, Clotho evaluation size (target: 5.5M pairs in <= 10 s on an H200), every check in one
command:  bash jobs/gpu_check.sh   (its rows step alone:
  python jobs/bench_scoring.py --device cuda --precision bf16 --audios 1045 --captions 5225 --rounds 1)

Rows, all on the same synthetic audio x caption matrix, measured in one process and
interleaved round by round (the machine may be shared: medians over rounds, and ratios
taken within a round):
  (a) naive: `pair_loss` (projection + plain nn.TransformerDecoder) over batches of pairs
      in random order, each batch padded to its longest caption, fp32, nothing reused;
      on --naive-pairs pairs drawn from the matrix (all of them when the matrix is small);
  (b) PairScorer, fp32;  (c) PairScorer in --precision (its fastest mode, bf16);
  (d) precision bf16-refined's cost: (c) plus fp32 re-scoring of --refine-share of the pairs.
(b) and (c) time everything they do: construction (projection, memory keys/values) and
loss_matrix over all captions. Useful FLOPs are the model's FLOPs per pair on its real
(unpadded) tokens, `aacray.scorer.pair_flops`, summed over the pairs scored; their
rate is given as a share of a 2048^3 matmul measured in the same run at the precision of
the row (fp32 for a and b). The `executed` column counts what the fast path must compute
at least (per pair work, plus per audio and per caption work once).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import nullcontext

import numpy as np
import torch

from aacray import machine
from aacray.decoder import CaptionDecoder, DecoderConfig, pair_loss, pair_loss_memory
from aacray.scorer import SCREENING, PairScorer, pair_flops

PAD, BOS, EOS = 0, 1, 2


def clotho_like_lengths(rng: np.random.Generator, m: int) -> np.ndarray:
    """Caption lengths in words, 8..20 like Clotho's, skewed to short ones (mean ~11.2)."""
    k = np.arange(13)
    p = np.exp(-k / 4.5)
    return 8 + rng.choice(k, size=m, p=p / p.sum())


def synthetic(n_audios: int, n_captions: int, n_frames: int, vocab: int, seed: int):
    rng = np.random.default_rng(seed)
    frames = [rng.standard_normal((n_frames, 768), dtype=np.float32) for _ in range(n_audios)]
    tokens = [[BOS, *rng.integers(4, vocab, n).tolist(), EOS] for n in clotho_like_lengths(rng, n_captions)]
    return frames, tokens


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 7) -> float:
    """FLOP/s of an n^3 matmul, median of reps."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.matmul(a, b)
    ts = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        ts.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(ts)


def naive_losses(model, frames, tokens, pairs: np.ndarray, batch: int, device) -> np.ndarray:
    """(a): pairs (P, 2) of (audio, caption) in the given order, batches padded to their
    longest caption (all audios have the same length here), fp32, per-pair everything."""
    out = np.empty(len(pairs), np.float32)
    with torch.inference_mode():
        for p0 in range(0, len(pairs), batch):
            pb = pairs[p0 : p0 + batch]
            x = torch.from_numpy(np.stack([frames[a] for a in pb[:, 0]])).to(device)
            T = max(len(tokens[c]) for c in pb[:, 1])
            tok = torch.full((len(pb), T), PAD, dtype=torch.long)
            for j, c in enumerate(pb[:, 1]):
                tok[j, : len(tokens[c])] = torch.tensor(tokens[c])
            out[p0 : p0 + len(pb)] = pair_loss(model, x, None, tok.to(device), PAD).cpu().numpy()
    return out


def flops_of(cfg, vocab, tokens, n_audios, n_frames, caption_idx=None):
    """(useful FLOPs of all pairs, minimum the fast path executes) for n_audios x captions."""
    caps = range(len(tokens)) if caption_idx is None else caption_idx
    useful = executed = 0.0
    for c in caps:
        f = pair_flops(cfg, vocab, len(tokens[c]) - 1, n_frames)
        useful += n_audios * f["total"]
        executed += n_audios * f["per_pair"] + f["per_caption"]
    executed += n_audios * pair_flops(cfg, vocab, 1, n_frames)["per_audio"]
    return useful, executed


def run_rows(args, device) -> None:
    torch.manual_seed(args.seed)
    cfg = DecoderConfig()
    model = CaptionDecoder(cfg, args.vocab, PAD).to(device).eval()
    frames, tokens = synthetic(args.audios, args.captions, args.frames, args.vocab, args.seed)
    N, M = args.audios, args.captions
    rng = np.random.default_rng(args.seed + 1)
    all_pairs = np.stack(np.divmod(np.arange(N * M), M), 1)
    n_naive = min(args.naive_pairs, N * M) if args.naive_pairs > 0 else 0
    naive_pairs = all_pairs[rng.permutation(N * M)[:n_naive]]

    # bf16's rate and rows (ablations included) only with --precision bf16: a CPU without bf16
    # matrix units (no avx512_bf16 or AMX) emulates bf16 matmul at ~1% of fp32's rate
    use_bf16 = args.precision == "bf16"
    dtypes = {"fp32": torch.float32, **({"bf16": torch.bfloat16} if use_bf16 else {})}
    rates = {k: matmul_rate(device, dt) for k, dt in dtypes.items()}
    rates.setdefault("bf16", float("nan"))
    words = np.array([len(t) - 2 for t in tokens])
    print(
        f"{machine.describe(device)}; load avg {os.getloadavg()[0]:.1f}\nmodel: paper size, V={args.vocab}, {cfg.n_layers} layers D={cfg.d_model} "
        f"H={cfg.n_heads} F={cfg.d_ff}; {N} audios x {args.frames} frames, {M} captions of "
        f"{words.min()}-{words.max()} words (mean {words.mean():.2f}); naive on {n_naive} pairs\n"
        f"matmul 2048^3: fp32 {rates['fp32'] / 1e9:.0f} GFLOP/s, bf16 {rates['bf16'] / 1e9:.0f} GFLOP/s",
        flush=True,
    )
    useful_all, executed_all = flops_of(cfg, args.vocab, tokens, N, args.frames)
    useful_naive = sum(pair_flops(cfg, args.vocab, len(tokens[c]) - 1, args.frames)["total"] for c in naive_pairs[:, 1])

    def scorer_row(precision):
        return lambda: PairScorer(model, PAD, frames, device, precision, args.pairs_per_batch).loss_matrix(tokens)

    rows: dict[str, dict] = {}
    if n_naive:
        rows["(a) naive fp32"] = dict(fn=lambda: naive_losses(model, frames, tokens, naive_pairs, args.naive_batch, device),
                                      pairs=n_naive, useful=useful_naive, executed=None, rate="fp32")
    rows["(b) PairScorer fp32"] = dict(fn=scorer_row("fp32"), pairs=N * M, useful=useful_all, executed=executed_all, rate="fp32")
    rows[f"(c) PairScorer {args.precision}"] = dict(
        fn=scorer_row(args.precision), pairs=N * M, useful=useful_all, executed=executed_all,
        rate="bf16" if args.precision == "bf16" else "fp32",
    )
    if args.precision == "bf16" and args.refine_share > 0:
        add_refined(rows, args, model, frames, tokens, rng, useful_all, device)
    if args.ablations is not None:
        kept = set(rows)
        add_ablations(rows, args, model, frames, tokens, naive_pairs, useful_naive, useful_all, executed_all, device)
        for name in [k for k in rows if k not in kept and not wanted(args, k)]:
            del rows[name]

    times, round_rates, outputs = time_rows(rows, dtypes, args.rounds, device)
    print_table(rows, times, round_rates, outputs, "(a) naive fp32" if n_naive else None, naive_pairs, args.rounds)


def wanted(args, name: str) -> bool:
    """Whether --ablations asks for the ablation row `name` (every row without TEXT). Rows
    are dropped after add_ablations when not wanted; those that cost work to build (the
    torch.compile rows compile) are not built at all."""
    return args.ablations is not None and args.ablations in name


def add_refined(rows, args, model, frames, tokens, rng, useful_all, device) -> None:
    """Row (d), what precision bf16-refined costs: a bf16 scorer over every pair, then an fp32
    scorer (built too, as an actor builds both) re-scoring refine_share of each caption's
    audios with loss_pairs. On random weights the refinement windows mean nothing, so the
    share is set (--refine-share; measured on trained-model matrices, docs/benchmarks.md)
    and the pairs drawn at random: the cost does not depend on which pairs they are."""
    N, M = args.audios, args.captions
    n_re = max(1, round(args.refine_share * N))
    re_rows = np.concatenate([rng.choice(N, n_re, replace=False) for _ in range(M)])
    re_cols = np.repeat(np.arange(M), n_re)

    def refined(screen):
        def run():
            L = PairScorer(model, PAD, frames, device, "bf16", args.pairs_per_batch, **screen).loss_matrix(tokens)
            exact = PairScorer(model, PAD, frames, device, "fp32", args.pairs_per_batch)
            L[re_rows, re_cols] = exact.loss_pairs(re_rows, tokens, re_cols)
            return L
        return run

    # its screening pass as BlockScorer builds it (SCREENING)
    share = f"{n_re * M / (N * M):.1%} re-scored"
    rows[f"(d) bf16-refined, {share}"] = dict(fn=refined(SCREENING), pairs=N * M, useful=useful_all, executed=None, rate="bf16")
    for what, screen in [("as plain bf16", {}), ("with the fp32 classifier", {**SCREENING, "classifier_bf16": False})]:
        name = f"(d) bf16-refined, {share}, screening {what}"
        if wanted(args, name):
            rows[name] = dict(fn=refined(screen), pairs=N * M, useful=useful_all, executed=None, rate="bf16")


def time_rows(rows, dtypes, rounds: int, device):
    """Every row once per round, in order, the matmul rate of each dtype measured at the
    start of each round; -> (seconds per row per round, rates per round, first outputs)."""
    times: dict[str, list[float]] = {k: [] for k in rows}
    round_rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    outputs: dict[str, np.ndarray] = {}
    for r in range(rounds):
        for prec in ("fp32", "bf16"):
            round_rates[prec].append(matmul_rate(device, dtypes[prec], reps=3) if prec in dtypes else float("nan"))
        for name, row in rows.items():
            sync(device)
            t = time.perf_counter()
            out = row["fn"]()
            sync(device)
            times[name].append(time.perf_counter() - t)
            outputs.setdefault(name, out)
        print(
            f"round {r + 1}/{rounds} (matmul fp32 {round_rates['fp32'][-1] / 1e9:.0f}, bf16 "
            f"{round_rates['bf16'][-1] / 1e9:.0f} GFLOP/s), pairs/s: "
            + "  ".join(f"[{i}] {rows[k]['pairs'] / v[-1]:.0f}" for i, (k, v) in enumerate(times.items())),
            flush=True,
        )
    return times, round_rates, outputs


def print_table(rows, times, round_rates, outputs, base, naive_pairs, rounds: int) -> None:
    """The rows' medians over the rounds: pairs/s, x (a) and the matmul shares as medians of
    per-round ratios, and each row's largest loss difference from (a) on (a)'s pairs."""
    ref = outputs.get(base)
    print(
        "\n| | row | pairs/s | x (a) | useful GFLOP/s | share of matmul | executed share | max abs loss diff vs (a) |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    for i, (name, row) in enumerate(rows.items()):
        pps = [row["pairs"] / t for t in times[name]]
        ratio = "1.00" if name == base else "-"
        if base and name != base:
            ratio = f"{statistics.median([p * tb / rows[base]['pairs'] for p, tb in zip(pps, times[base], strict=True)]):.2f}"
        flops = [row["useful"] / t for t in times[name]]
        share = statistics.median([f / mr for f, mr in zip(flops, round_rates[row["rate"]], strict=True)])
        ex = "-"
        if row["executed"]:
            ex = f"{statistics.median([row['executed'] / t / mr for t, mr in zip(times[name], round_rates[row['rate']], strict=True)]):.0%}"
        diff = "-"
        if ref is not None and name != base:
            out = outputs[name]
            got = out if out.ndim == 1 else out[naive_pairs[:, 0], naive_pairs[:, 1]]
            diff = f"{np.abs(got - ref).max():.1e}"
        print(
            f"| [{i}] | {name} | {statistics.median(pps):.0f} | {ratio} | {statistics.median(flops) / 1e9:.0f} | "
            f"{share:.0%} of {row['rate']} | {ex} | {diff} |"
        )
    print(f"(medians over {rounds} rounds; x (a) and the shares are medians of per-round ratios, the matmul rate measured in each round)")


def module_losses(model, frames, tokens, batch: int, device, bf16: bool = False) -> np.ndarray:
    """The scorer before FastDecoder, for the ablation rows: every audio projected once
    (`model.encode`), then per caption the whole nn.TransformerDecoder (`pair_loss_memory`)
    against chunks of `batch` audios; bf16 through autocast when asked (the only autocast
    left in the project: the scorer itself runs bf16 on bf16 weight copies)."""
    out = np.empty((len(frames), len(tokens)), np.float32)
    with torch.inference_mode():
        memory = model.encode(torch.from_numpy(np.stack(frames)).to(device))  # equal lengths here
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            for j, t in enumerate(tokens):
                tok = torch.tensor(t, dtype=torch.long, device=device)[None]
                for a0 in range(0, len(frames), batch):
                    a1 = min(a0 + batch, len(frames))
                    losses = pair_loss_memory(model, memory[a0:a1], None, tok.expand(a1 - a0, -1), PAD)
                    out[a0:a1, j] = losses.float().cpu().numpy()
    return out


def compiled_scorer(model, frames, tokens, precision: str, args, device, mode: str | None = None):
    """The ablation row `torch.compile`: `FastDecoder.losses` (the per-pair forward, where
    the layer norms, residual adds, softmaxes and GELU are separate passes) compiled by
    inductor with dynamic shapes (one graph for every caption length and chunk size), on
    `F.linear` weights (inductor packs them for oneDNN itself on CPU: freezing). Compiled and
    warmed once here, outside the timed rounds; the compile time is printed. The timed call
    is `loss_matrix` on that scorer (its construction, ~1/M of the work, not repeated).
    mode "reduce-overhead" (CUDA): inductor replays CUDA graphs, one per shape."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = device.type == "cpu"
    sc = PairScorer(model, PAD, frames, device, precision, args.pairs_per_batch, pack_weights=False)
    sc.fast.losses = torch.compile(sc.fast.losses, dynamic=True, mode=mode)
    t = time.perf_counter()
    sc.loss_matrix(tokens)
    print(f"torch.compile {precision} (mode {mode}): compiled and warmed in {time.perf_counter() - t:.0f} s", flush=True)
    return lambda: sc.loss_matrix(tokens)


def thread_streams(model, frames, tokens, precision: str, pairs_per_batch: int, device, n: int):
    """n Python threads of one intra-op thread each, caption j scored by stream j % n with a
    scorer of its own: how n actors of one CPU share a node, without Ray (about 1.1x one
    n-thread scorer on a 2-core AMX Xeon, docs/benchmarks.md)."""

    def run():
        parts: dict[int, np.ndarray] = {}
        errors: list[BaseException] = []

        def stream(i):
            try:
                torch.set_num_threads(1)
                parts[i] = PairScorer(model, PAD, frames, device, precision, pairs_per_batch).loss_matrix(tokens[i::n])
            except BaseException as e:  # re-raised in the caller
                errors.append(e)

        threads = torch.get_num_threads()
        workers = [threading.Thread(target=stream, args=(i,)) for i in range(n)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        torch.set_num_threads(threads)
        if errors:
            raise errors[0]
        out = np.empty((len(frames), len(tokens)), np.float32)
        for i, part in parts.items():
            out[:, i::n] = part
        return out

    return run


def add_ablations(rows, args, model, frames, tokens, naive_pairs, useful_naive, useful_all, executed_all, device):
    """Variants of the scorer, for the kept/discarded table of docs/benchmarks.md; each is
    PairScorer with public arguments."""
    N, M = args.audios, args.captions

    def scorer(precision, pairs_per_batch=None, **kw):
        ppb = pairs_per_batch or args.pairs_per_batch
        return lambda: PairScorer(model, PAD, frames, device, precision, ppb, **kw).loss_matrix(tokens)

    def module(bf16):
        return lambda: module_losses(model, frames, tokens, args.pairs_per_batch, device, bf16)

    fp32 = dict(pairs=N * M, useful=useful_all, executed=executed_all, rate="fp32")
    bf16 = dict(fp32, rate="bf16")
    precisions = {"fp32": fp32, **({"bf16": bf16} if args.precision == "bf16" else {})}
    for prec, kind in precisions.items():  # compiled here, so only when the row is asked for
        for mode, name in [(None, f"fast {prec}, torch.compile (warm)")] + (
            [("reduce-overhead", f"fast {prec}, torch.compile + CUDA graphs (warm)")] if device.type == "cuda" else []
        ):
            if wanted(args, name):
                rows[name] = dict(fn=compiled_scorer(model, frames, tokens, prec, args, device, mode), **kind)
    rows["previous PairScorer fp32 (module, per caption)"] = dict(fn=module(False), **fp32)
    if "bf16" in precisions:
        rows["previous PairScorer bf16 autocast"] = dict(fn=module(True), **bf16)
    if len(naive_pairs) and "bf16" in precisions:
        def naive_bf16():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return naive_losses(model, frames, tokens, naive_pairs, args.naive_batch, device)
        rows["naive bf16 autocast"] = dict(fn=naive_bf16, pairs=len(naive_pairs), useful=useful_naive, executed=None, rate="bf16")
    if device.type == "cpu":
        rows["fast fp32, F.linear (no oneDNN packing)"] = dict(fn=scorer("fp32", pack_weights=False), **fp32)
        if "bf16" in precisions:
            rows["fast bf16, F.linear (no oneDNN packing)"] = dict(fn=scorer("bf16", pack_weights=False), **bf16)
        rows["fast fp32, SDPA attention"] = dict(fn=scorer("fp32", fused_attention=True), **fp32)
        for n in (256, 768):
            rows[f"fast fp32, {n} rows per forward"] = dict(fn=scorer("fp32", cpu_rows=n), **fp32)
        if "bf16" in precisions:
            rows["fast bf16, SDPA attention"] = dict(fn=scorer("bf16", fused_attention=True), **bf16)
            for n in (256, 768):
                rows[f"fast bf16, {n} rows per forward"] = dict(fn=scorer("bf16", cpu_rows=n), **bf16)
        rows["fast fp32, classifier on the whole forward"] = dict(fn=scorer("fp32", classifier_rows=None), **fp32)
        if "bf16" in precisions:
            rows["fast bf16, classifier on the whole forward"] = dict(fn=scorer("bf16", classifier_rows=None), **bf16)
        # the whole index in one forward per caption
        rows["fast fp32, whole index per forward"] = dict(fn=scorer("fp32", N, cpu_rows=None), **fp32)
        n = torch.get_num_threads()
        if n > 1:  # as score_matrix's CPU actors run: num_cpus 1 each
            for prec, kind in precisions.items():
                rows[f"fast {prec}, {n} one-thread streams (captions split, each builds its scorer)"] = dict(
                    fn=thread_streams(model, frames, tokens, prec, args.pairs_per_batch, device, n), **kind
                )
    if "bf16" in precisions:  # the classifier bf16 keeps in bf16, and what bf16-refined's screening adds
        rows["fast bf16, fp32 classifier"] = dict(fn=scorer("bf16", classifier_bf16=False), **bf16)
        rows["fast bf16, bf16 residual stream and norms"] = dict(fn=scorer("bf16", stream_bf16=True), **bf16)


# --- top-10 rankings on the demo ------------------------------------------------------------
def _min_gap(scores: np.ndarray, k: int = 10) -> float:
    """Smallest gap between neighbours among a query's k + 1 best scores (ties excluded:
    they are broken by id, identically at any precision)."""
    top = np.sort(scores)[: k + 1]
    gaps = np.diff(top)
    gaps = gaps[gaps > 0]
    return float(gaps.min()) if gaps.size else np.inf


def demo_ranks(args, device) -> None:
    """Rankings of the demo checkpoint at fp32, bf16 and bf16-refined on an extract output
    (--demo-extract, --demo-subsets): lists identical to fp32's, metrics, pairs/s. Scored as
    score_matrix scores: caption blocks of --demo-block captions sorted by length, each block
    against every audio (construction included in the times)."""
    from aacray import checkpoint as ckpt_lib
    from aacray import storage
    from aacray.embeddings import read_captions, read_embeddings
    from aacray.retrieval import merge_blocks, minmax_scale, retrieval_metrics, score_block
    from aacray.scorer import BlockScorer, tokenize

    tr, ex = args.demo_checkpoint, args.demo_extract
    if not (
        storage.exists(storage.join(tr, "_MANIFEST.json"))
        and storage.exists(storage.join(ex, "_MANIFEST.json"))
    ):
        print(f"\n--demo-ranks: {tr} or {ex} has no manifest yet; skipped")
        return
    model, tok, _ = ckpt_lib.load(tr, device)
    es = read_embeddings(ex, args.demo_subsets)
    caps = read_captions(ex, args.demo_subsets)
    cids = caps.column("caption_id").to_pylist()
    gt = dict(zip(cids, caps.column("audio_id").to_pylist(), strict=True))
    tokens = tokenize(tok, caps.column("text").to_pylist(), model.cfg.max_tokens)
    order = sorted(range(len(cids)), key=lambda j: (len(tokens[j]), cids[j]))
    blocks = [order[i : i + args.demo_block] for i in range(0, len(order), args.demo_block)]
    n_pairs = len(es.audio_ids) * len(cids)
    print(
        f"\nRankings on {ex} {args.demo_subsets}: {len(es.audio_ids)} audios x {len(cids)} captions = {n_pairs} pairs, "
        f"V={model.vocab_size}, blocks of {args.demo_block} captions, {torch.get_num_threads()} threads"
    )
    L, res, secs, share = {}, {}, {}, {}
    for precision in ("fp32", "bf16", "bf16-refined"):
        t = time.perf_counter()
        sc = BlockScorer(model, tok.pad_id, es.frames, device, precision, args.pairs_per_batch, args.refine_margin)
        Lp, parts, rescored = np.empty((len(es.audio_ids), len(cids))), [], 0
        for b in blocks:
            Lb, info = sc.losses([tokens[j] for j in b], 10)
            Lp[:, b] = Lb
            rescored += info["rescored"] if info else 0
            parts.append(score_block(Lb, es.audio_ids, [cids[j] for j in b], 10))
        res[precision] = merge_blocks(parts, 10)
        secs[precision], L[precision], share[precision] = time.perf_counter() - t, Lp, rescored / n_pairs
    Lf = L["fp32"]
    error_distribution(model, tok.pad_id, es.frames, tokens, Lf, args, device)
    lo, hi = Lf.min(axis=0), Lf.max(axis=0)
    gaps = {
        "t2a": np.array([_min_gap(Lf[:, j]) for j in range(Lf.shape[1])]),
        "a2t_raw": np.array([_min_gap(Lf[i]) for i in range(Lf.shape[0])]),
        "a2t_minmax": np.array([_min_gap(r) for r in minmax_scale(Lf, lo, hi)]),
    }
    kinds = ("t2a", "a2t_raw", "a2t_minmax")
    ref = res["fp32"]
    m_ref = retrieval_metrics(ref.t2a, ref.a2t_raw, ref.a2t_minmax, gt)
    for name in ("fp32", "bf16", "bf16-refined"):
        line = f"{name:>13}: {n_pairs / secs[name]:.0f} pairs/s ({n_pairs / secs[name] / (n_pairs / secs['fp32']):.2f}x fp32)"
        if name == "bf16-refined":
            line += f", {share[name]:.1%} of pairs re-scored in fp32"
        print(line)
        if name == "fp32":
            continue
        got = res[name]
        print(f"    max |loss - fp32| over all pairs {np.abs(L[name] - Lf).max():.1e}")
        for k in kinds:
            a, b = getattr(ref, k).lists(), getattr(got, k).lists()
            differ = [q for q in a if a[q] != b[q]]
            sa, sb = getattr(ref, k), getattr(got, k)
            same_vals = np.array_equal(sa.score, sb.score) and np.array_equal(sa.loss, sb.loss)
            print(f"    top-10 {k}: {len(a) - len(differ)}/{len(a)} lists identical"
                  + ("; scores bit-identical" if same_vals else ""))
        m = retrieval_metrics(got.t2a, got.a2t_raw, got.a2t_minmax, gt)
        for k in kinds:
            cells = [f"{r} {m_ref[k][r]:.4f}" + ("" if m[k][r] == m_ref[k][r] else f" -> {m[k][r]:.4f}")
                     for r in m_ref[k] if r != "n_queries"]
            print(f"    {k}: " + ", ".join(cells))
    for k, g in gaps.items():
        q = np.quantile(g[np.isfinite(g)], [0.1, 0.5])
        unit = "min-max units" if k == "a2t_minmax" else "loss"
        print(f"fp32 smallest gap among the 11 best ({unit}), {k}: 10% of lists < {q[0]:.1e}, median {q[1]:.1e}")


def error_distribution(model, pad_id, frames, tokens, Lf: np.ndarray, args, device) -> None:
    """|loss - fp32| / fp32 over every pair, for plain bf16 and with each part bf16-refined's
    screening pass may add (`SCREENING` says which it does): the distribution `SCREENING`
    and `REFINE_MARGIN` (the bound refine_block assumes) are set from."""
    from aacray.scorer import REFINE_MARGIN

    parts = {"bf16": {}, "bf16, fp32 classifier": dict(classifier_bf16=False), "+ bf16 stream": dict(stream_bf16=True),
             "+ bf16 stream, fp32 classifier": dict(classifier_bf16=False, stream_bf16=True)}
    print(f"bf16-refined screens with {SCREENING}")
    for name, screen in parts.items():
        Lb = PairScorer(model, pad_id, frames, device, "bf16", args.pairs_per_batch, **screen).loss_matrix(tokens)
        rel = np.abs(Lb - Lf) / np.maximum(np.abs(Lf), 1e-12)
        q = np.quantile(rel, [0.5, 0.99, 0.999, 0.9999])
        print(f"{name:>17}: |loss - fp32| / fp32 median {q[0]:.1e}, 99% {q[1]:.1e}, 99.9% {q[2]:.1e}, "
              f"99.99% {q[3]:.1e}, max {rel.max():.1e} (refine margin {REFINE_MARGIN:.0e}: "
              f"{(rel > REFINE_MARGIN).sum()} of {rel.size} pairs above)")


# --- Ray Data against the in-process scorer ---------------------------------------------------
def ray_vs_inprocess(args) -> None:
    """The job against the in-process scorer on the same pairs. The 2-thread in-process run
    brackets the job (before and after): on a shared machine the rate drifts over the minutes
    a run takes, and the ratio is taken against the mean of the two."""
    from aacray import checkpoint as ckpt_lib
    from aacray.config import ScoreConfig, load_config
    from aacray.scoring import load_inputs

    cfg = load_config(ScoreConfig, [args.ray_config, *args.ray_set])
    model, tok, _ = ckpt_lib.load(cfg.checkpoint)
    audio, cids, tokens, _, _ = load_inputs(cfg.audio, cfg.audio_subsets, cfg.captions, cfg.caption_subsets, tok, model.cfg.max_tokens)
    n_pairs = len(audio.audio_ids) * len(cids)
    cpus = int(cfg.actors.num_actors * cfg.actors.num_cpus)
    print(f"\nscore_matrix via Ray Data vs in-process PairScorer: {args.ray_config}, {len(audio.audio_ids)} x "
          f"{len(cids)} = {n_pairs} pairs, {cfg.scorer.precision}, {cfg.actors.num_actors} actors x {cfg.actors.num_cpus} CPU")
    threads = torch.get_num_threads()

    def inprocess(n_threads: int, when: str) -> float:
        torch.set_num_threads(n_threads)
        t = time.perf_counter()
        PairScorer(model, tok.pad_id, audio.frames, "cpu", cfg.scorer.precision, cfg.scorer.pairs_per_batch).loss_matrix(tokens)
        rate = n_pairs / (time.perf_counter() - t)
        torch.set_num_threads(threads)
        print(f"in-process {when}, {n_threads} thread(s), construction included: {rate:.0f} pairs/s", flush=True)
        return rate

    one = None if args.ray_no_one_thread else inprocess(1, "before the job")
    before = inprocess(cpus, "before the job")
    m, samples, pid = run_score_job(args)
    after = inprocess(cpus, "after the job")
    base = (before + after) / 2
    print(f"Ray / in-process ({cpus} threads, mean of before and after {base:.0f}): {m['pairs_per_s'] / base:.0%} "
          f"(against before only {m['pairs_per_s'] / before:.0%}, after only {m['pairs_per_s'] / after:.0%})"
          + (f"; Ray / ({cpus} x in-process 1 thread): {m['pairs_per_s'] / (cpus * one):.0%}" if one else ""))
    t = m["timing"]
    per_actor = n_pairs / t["block_seconds_total"]  # pairs per second of one actor's block time
    print(f"where the job's time went (metrics.json timing): Ray Data run {t['ray_data_seconds']} s, first block after "
          f"{t['first_block_after_seconds']} s (actor set-up {t['actor_setup_seconds_max']} s of it), idle at the end "
          f"{t['idle_at_end_seconds']} s, actors busy {t['actor_busy_share']:.1%}; reduction {t['reduce_seconds']} s; "
          f"inside the blocks one actor scores {per_actor:.0f} pairs/s"
          + (f" = {per_actor / one:.0%} of the in-process 1-thread scorer" if one else ""))
    if samples:
        print_cpu_by_role(machine.cpu_by_role(samples, pid, os.sysconf("SC_CLK_TCK")))


def run_score_job(args) -> tuple[dict, list, int]:
    """jobs/score_matrix.py on --ray-config in a subprocess -> (its metrics.json, /proc samples
    taken while it ran when --ray-cpu, its pid); prints its pairs/s and wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "jobs/score_matrix.py", args.ray_config, *args.ray_set, f"output={tmp}/score"]
        t = time.perf_counter()
        job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        samples = sample_processes(job, 0.25) if args.ray_cpu else []
        if job.wait() != 0:
            raise subprocess.CalledProcessError(job.returncode, cmd)
        wall = time.perf_counter() - t
        with open(f"{tmp}/score/metrics.json") as f:
            m = json.load(f)
    print(f"score_matrix: pairs_per_s {m['pairs_per_s']} (score_seconds {m['score_seconds']}: actor start-up, "
          f"scoring, block reduction), whole job {wall:.1f} s", flush=True)
    return m, samples, job.pid


def sample_processes(job: subprocess.Popen, interval: float) -> list:
    """`machine.read_processes` every `interval` seconds until `job` ends."""
    samples = []
    while job.poll() is None:
        samples.append((time.perf_counter(), *machine.read_processes()))
        time.sleep(interval)
    samples.append((time.perf_counter(), *machine.read_processes()))
    return samples


def print_cpu_by_role(phases: dict) -> None:
    """One column per phase: CPU-s by role and the share of the machine's CPU time."""
    cores = os.cpu_count() or 1
    print(f"CPU seconds by process role (share of {cores} CPUs x the phase), sampled from /proc:")
    roles = sorted({r for ph in phases.values() for r in ph} - {"seconds"}, key=lambda r: (r == "idle", r))
    print("| role | " + " | ".join(f"{name} ({ph['seconds']:.1f} s)" for name, ph in phases.items()) + " |")
    print("| --- |" + " --- |" * len(phases))
    for role in roles:
        cells = [f"{ph.get(role, 0.0):.1f} ({ph.get(role, 0.0) / max(cores * ph['seconds'], 1e-9):.1%})" for ph in phases.values()]
        print(f"| {role} | " + " | ".join(cells) + " |")


# --- score_matrix at scale on a synthetic index ----------------------------------------------
def pseudo_words(n: int) -> list[str]:
    """n distinct letter-only words ("qaaa", "qaab", ...): each its own vocabulary entry."""
    abc = "abcdefghijklmnopqrstuvwxyz"
    return ["q" + "".join(abc[(i // 26**p) % 26] for p in (2, 1, 0)) for i in range(n)]


def synthetic_job_inputs(root: str, args) -> tuple[str, str, list[list[int]], int]:
    """An extract output under root (--audios clips of --frames frames, 5 captions a clip as
    in Clotho, caption i describing clip i // 5, Clotho-like lengths over --vocab words) and a
    random paper-size checkpoint whose tokenizer holds those words: (extract, checkpoint,
    the captions' token lists in caption order, the vocabulary size)."""
    from aacray.synthetic import write_extract_output, write_random_checkpoint

    rng = np.random.default_rng(args.seed)
    n, m = args.audios, args.captions
    ids = [f"syn_{i:06d}.wav" for i in range(n)]
    frames = [rng.standard_normal((args.frames, 768), dtype=np.float32) for _ in range(n)]
    vocab = pseudo_words(args.vocab - 4)  # + pad, bos, eos, unk
    texts = [" ".join(rng.choice(vocab, k)) for k in clotho_like_lengths(rng, m)]
    owner = [ids[j * n // m] for j in range(m)]  # caption j describes clip j * n // m
    caps = [(f"{owner[j]}#{j}", "evaluation", texts[j], owner[j]) for j in range(m)]
    ext, ckpt = os.path.join(root, "extract"), os.path.join(root, "checkpoint")
    write_extract_output(ext, ids, ["evaluation"] * n, frames, caps)
    tok = write_random_checkpoint(ckpt, texts, args.seed)
    return ext, ckpt, [tok.encode(t) for t in texts], tok.vocab_size


def job_config(root: str, ext: str, ckpt: str, precision: str, args, device: torch.device) -> dict:
    """score_matrix's config for the synthetic index: one actor a GPU on CUDA, --job-actors
    on CPU sharing the CPUs."""
    on_gpu = device.type == "cuda"
    cpus = 1 if on_gpu else max(1, (os.cpu_count() or 1) // args.job_actors)
    return {
        "checkpoint": ckpt, "audio": ext, "captions": ext, "output": os.path.join(root, f"score_{precision}"),
        "k": 10, "caption_block_size": args.job_block, "write_scores": args.job_write_scores, "plots": False,
        "dcase_export": False, "scorer": {"precision": precision, "pairs_per_batch": args.pairs_per_batch},
        "actors": {"num_actors": 1 if on_gpu else args.job_actors, "num_gpus": 1 if on_gpu else 0, "num_cpus": cpus},
        "ray": {"num_cpus": os.cpu_count()},
    }


def job_at_scale(args, device: torch.device, root: str) -> None:
    """jobs/score_matrix.py, as a user runs it (its own process, an embedded Ray), on the
    synthetic index, at each of --job-precisions: pairs/s over the job's score_seconds and
    that work's share of this device's matmul rate (useful and executed FLOPs, as the rows)."""
    import yaml

    ext, ckpt, tokens, vocab = synthetic_job_inputs(root, args)
    cfg = DecoderConfig()
    useful, executed = flops_of(cfg, vocab, tokens, args.audios, args.frames)
    kind = {p: "fp32" if p == "fp32" else "bf16" for p in args.job_precisions}  # the matmul rate a precision runs at
    rates = {k: matmul_rate(device, torch.float32 if k == "fp32" else torch.bfloat16) for k in set(kind.values())}
    print(f"\nscore_matrix on a synthetic index: {machine.describe(device)}\n{args.audios} audios x {args.captions} "
          f"captions = {args.audios * args.captions} pairs, random paper-size decoder, V = {vocab}, blocks of "
          f"{args.job_block} captions", flush=True)
    for precision in args.job_precisions:
        conf = job_config(root, ext, ckpt, precision, args, device)
        path = os.path.join(root, f"score_{precision}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(conf, f)
        t = time.perf_counter()
        subprocess.run([sys.executable, "jobs/score_matrix.py", path], check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t
        with open(os.path.join(conf["output"], "metrics.json")) as f:
            m = json.load(f)
        sec, rate = m["score_seconds"], rates[kind[precision]]
        refine = m["scorer"].get("refine", {})
        print(f"{precision:>13}: {m['pairs_per_s']:.0f} pairs/s over {sec:.1f} s of score_seconds (whole job {wall:.1f} s); "
              f"{useful / sec / rate:.0%} of the {kind[precision]} matmul rate "
              f"({rate / 1e12:.1f} TFLOP/s), executed {executed / sec / rate:.0%}"
              + (f"; {refine['rescored_share']:.1%} re-scored in fp32" if refine else ""), flush=True)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"], help="row (c)")
    p.add_argument("--audios", type=int, default=64)
    p.add_argument("--captions", type=int, default=128)
    p.add_argument("--frames", type=int, default=31)
    p.add_argument("--vocab", type=int, default=5000)
    p.add_argument("--pairs-per-batch", type=int, default=4096, help="PairScorer's (ScoreConfig default)")
    p.add_argument("--naive-batch", type=int, default=256, help="pairs per naive forward")
    p.add_argument("--naive-pairs", type=int, default=8192, help="pairs row (a) scores (0: skip it)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ablations", nargs="?", const="", default=None, metavar="TEXT",
                   help="also time the scorer variants (with TEXT: only those whose row name contains it)")
    p.add_argument("--demo-ranks", action="store_true", help="top-10 rankings fp32 vs bf16 vs bf16-refined, demo")
    p.add_argument("--demo-checkpoint", default="runs/demo/train_decoder")
    p.add_argument("--demo-extract", default="runs/demo/extract_embeddings", help="--demo-ranks: audios and captions")
    p.add_argument("--demo-subsets", nargs="*", default=["evaluation"])
    p.add_argument("--demo-block", type=int, default=256, help="--demo-ranks: captions per block (ScoreConfig default)")
    p.add_argument("--refine-margin", type=float, default=0.01, help="bf16-refined (ScoreConfig default)")
    p.add_argument(
        "--refine-share", type=float, default=0.09,
        help="row (d): share of pairs bf16-refined re-scores in fp32 (0: no row d); default: measured on the "
             "240 x 1200 demo-checkpoint matrix, docs/benchmarks.md",
    )
    p.add_argument("--ray", action="store_true", help="in-process scorer vs jobs/score_matrix.py")
    p.add_argument("--ray-config", default="configs/score_demo.yaml")
    p.add_argument(
        "--ray-set", nargs="*", default=[], metavar="KEY=VALUE",
        help="config overrides for --ray, e.g. 'audio_subsets=[development,validation,evaluation]' (a larger matrix)",
    )
    p.add_argument("--ray-no-one-thread", action="store_true", help="--ray: skip the 1-thread in-process run")
    p.add_argument("--ray-cpu", action="store_true",
                   help="--ray: sample /proc while the job runs; print CPU seconds by process role, start-up and scoring (Linux)")
    p.add_argument("--job", action="store_true", help="score_matrix end to end on a synthetic --audios x --captions index")
    p.add_argument("--job-precisions", nargs="+", default=["bf16", "bf16-refined"], choices=["fp32", "bf16", "bf16-refined"])
    p.add_argument("--job-block", type=int, default=256, help="--job: caption_block_size (ScoreConfig default)")
    p.add_argument("--job-actors", type=int, default=2, help="--job on CPU: actors sharing the CPUs (CUDA: one)")
    p.add_argument("--job-dir", help="--job: keep its inputs and outputs here (default: a temporary folder)")
    p.add_argument("--job-write-scores", action="store_true", help="--job: write every pair's loss (write_scores)")
    p.add_argument("--only", choices=["rows", "demo", "ray", "job"], help="run only this part")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.only in (None, "rows"):
        run_rows(args, device)
    if args.demo_ranks or args.only == "demo":
        demo_ranks(args, device)
    if args.ray or args.only == "ray":
        ray_vs_inprocess(args)
    if args.job or args.only == "job":
        with tempfile.TemporaryDirectory() if args.job_dir is None else nullcontext(args.job_dir) as root:
            job_at_scale(args, device, root)


if __name__ == "__main__":
    main(sys.argv[1:])
