"""Stage (the main job): score the audio x caption cross product, reduce, rank, evaluate.

Blocks. The caption set is cut into blocks of `caption_block_size` captions; each block is
scored against EVERY audio of the index by one actor of a Ray Data pool. So a block's
per-caption min/max and text-to-audio top-k are final when it finishes, and only the
per-audio audio-to-text candidates (raw and min-max) are merged across blocks, by the
driver, as block results stream in. The full N x M matrix never exists anywhere unless
`write_scores` asks for it (each actor then writes its block's rows itself).

Memory model: an actor holds the model and the projected audio index (N x S x D floats)
plus one block of losses (N x caption_block_size); the driver holds N x k and M x k
top-k rows and M caption stats. Cost model: pairs x FLOPs per pair / device rate (see
README).

Inside an actor (`PairScorer`) each audio is projected once, captions are sorted by
length so a batch pads little, and pairs run in batches of `pairs_per_batch`.
Numerics (`precision`): fp32 by default; bf16 (the decoder's matmuls in bf16, the loss
always reduced in fp32); bf16-refined (`BlockScorer`, `refine_block`): bf16 for every pair,
fp32 again for the pairs that decide the block's top-k lists and caption min/max, so the
tables and metrics are fp32's.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from contextlib import nullcontext

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from aacray import storage
from aacray.decoder import CaptionDecoder, pair_loss, pair_loss_memory
from aacray.embeddings import check_embeddings, duplicate_ids, read_captions, read_embeddings
from aacray.errors import BadInputError
from aacray.retrieval import (
    BlockResult,
    CaptionStats,
    TopK,
    retrieval_metrics,
    score_block,
    topk_merge,
)
from aacray.text import WordTokenizer, normalize

log = logging.getLogger("aacray.scoring")

TABLES = ["caption_stats", "topk_t2a", "topk_a2t", "topk_a2t_raw"]
BLOCKS = "_blocks"  # per-block results of an unfinished run (resume reads them)
# The scorer's numerics: recorded in metrics.json and part of the resume fingerprint, so a
# run resumed after an upgrade that changes float rounding does not mix two scorers' blocks.
# "fastdecode-1": aacray.fastdecode (cached audio K/V, per-caption prefix, fixed CPU chunks).
SCORER_VERSION = "fastdecode-1"
CORNER = 32  # heatmap side
N_CURVES = 3  # queries in the loss-curve figure



# --------------------------------------------------------------------------------------
# In-process scoring (pure torch; the actors and the tests call it)
# --------------------------------------------------------------------------------------


class PairScorer:
    """Loss matrix of a fixed audio index against any list of tokenised captions.

    Built once per actor: each audio is projected once (memory, sorted by length so that
    neighbours pad little) and, through `FastDecoder.audio_kv`, so are the cross-attention
    keys/values of every layer, kept for all N audios (memory cost: 2 x n_layers x the
    memory, N x S x 2 n_layers D floats). A caption's caption-only work (embedding, first
    self-attention) is done once, then its pairs run against fixed chunks of the sorted
    audio index (`_chunks`): a forward is one caption, unpadded, against one chunk.
    """

    # CPU forwards stop at about this many token rows (chunk audios x caption tokens): the
    # activations then stay cache-sized (docs/benchmarks.md); the GPU takes pairs_per_batch.
    CPU_ROWS = 768

    def __init__(
        self,
        model: CaptionDecoder,
        pad_id: int,
        frames: list[np.ndarray],
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        pairs_per_batch: int = 4096,
    ):
        from aacray.fastdecode import FastDecoder

        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        self.model = model.to(device).eval()
        self.pad_id = pad_id
        self.device = torch.device(device)
        self.precision = precision
        self.pairs_per_batch = pairs_per_batch
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
        )
        # audios sorted by length: a chunk of neighbours pads little
        self.n_audios = len(frames)
        lens = np.array([f.shape[0] for f in frames])
        self.order = np.argsort(lens, kind="stable")
        self.rank_of = np.empty(len(frames), dtype=np.int64)  # frames position -> sorted position
        self.rank_of[self.order] = np.arange(len(frames))
        self.lens = lens[self.order]
        S, D = int(lens.max()), model.cfg.d_model
        self.memory = torch.zeros(len(frames), S, D, device=self.device)
        self.mask = torch.ones(len(frames), S, dtype=torch.bool, device=self.device)
        with torch.inference_mode():
            for j, i in enumerate(self.order):
                f = torch.tensor(np.asarray(frames[i], np.float32), device=self.device)[None]
                self.memory[j, : f.shape[1]] = model.encode(f)[0].float()
                self.mask[j, : f.shape[1]] = False
        on_cpu = self.device.type == "cpu"
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.fast = FastDecoder(self.model, dtype, pack_rows=self.CPU_ROWS if on_cpu else None)
        self.max_rows = self.CPU_ROWS if on_cpu else None
        with torch.inference_mode():
            parts = [
                self.fast.audio_kv(self.memory[a0 : a0 + pairs_per_batch])
                for a0 in range(0, self.n_audios, pairs_per_batch)
            ]
            self.kv = [tuple(torch.cat([p[i][j] for p in parts]) for j in range(2)) for i in range(len(parts[0]))]
        self._chunk_cache: dict[int, list] = {}

    def _chunks(self, T: int) -> list[tuple[int, int, int, bool]]:
        """Fixed chunks (a0, a1, S, padded) of the sorted audio index for a caption of T input
        tokens: at most pairs_per_batch audios (and CPU_ROWS token rows on CPU). They depend
        on T and the index only, never on the other captions scored alongside."""
        if T not in self._chunk_cache:
            size = self.pairs_per_batch if self.max_rows is None else max(1, min(self.pairs_per_batch, self.max_rows // T))
            out = []
            for a0 in range(0, self.n_audios, size):
                a1 = min(a0 + size, self.n_audios)
                S = int(self.lens[a1 - 1])
                out.append((a0, a1, S, bool(self.lens[a0] < S)))
            self._chunk_cache[T] = out
        return self._chunk_cache[T]

    def _kv(self, rows: slice | torch.Tensor, S: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k[rows, :, :S], v[rows, :, :S]) for k, v in self.kv]

    def loss_matrix(self, tokens: list[list[int]]) -> np.ndarray:
        """Token id lists of m captions ([bos .. eos]) -> losses (N, m) float32.

        Every forward is one caption (unpadded) against one fixed chunk of the length-sorted
        audio index, so a pair's loss is computed the same way, to the bit, whatever the
        caption block it arrives in and whichever actor scores it.
        """
        m = len(tokens)
        out = np.empty((self.n_audios, m), dtype=np.float32)
        with torch.inference_mode():
            for j in range(m):
                tok = torch.tensor(tokens[j], dtype=torch.long, device=self.device)[None]
                assert tok.shape[1] >= 2, f"caption {j} has no target token: {tokens[j]}"
                prefix = self.fast.prefix(tok[:, :-1])
                for a0, a1, S, padded in self._chunks(tok.shape[1] - 1):
                    mask = self.mask[a0:a1, :S] if padded else None
                    losses = self.fast.losses(prefix, self._kv(slice(a0, a1), S), mask, tok[:, 1:])
                    out[self.order[a0:a1], j] = losses.cpu().numpy()
        return out

    def loss_at(self, tokens: list[list[int]], audio_index, caption_index) -> np.ndarray:
        """Losses (P,) float32 of the pairs (audio_index[p], tokens[caption_index[p]]) (audio
        positions in the constructor's frames), computed the way `loss_matrix` computes them.

        A pair runs as in `loss_matrix`: its caption's prefix computed alone, its audio
        padded to the frame count of its fixed chunk. Pairs of captions with the same
        length whose audios fall in the same chunk share forwards (one prefix per pair,
        stacked); the rows of a forward do not mix. The BLAS kernels may still round a row
        differently when the forward has another row count (a one-pair forward does on this
        CPU, so a lone pair takes a neighbour along; seen otherwise: 1 pair in 1,600 off by
        one ulp for a width-32 model, none at the paper's width), so the losses equal
        `loss_matrix`'s to the last bit, not always in it. Captions with the same tokens get
        the same bits (computed once), so duplicate captions tie exactly, as in
        `loss_matrix`. The fp32 half of precision "bf16-refined" (`refine_block`).
        """
        from aacray.fastdecode import Prefix

        audio_index = np.asarray(audio_index, dtype=np.int64)
        caption_index = np.asarray(caption_index, dtype=np.int64)
        if audio_index.size == 0:
            return np.empty(0, dtype=np.float32)
        # one computation per distinct (audio, token sequence)
        first: dict[tuple, int] = {}
        canon = np.array([first.setdefault(tuple(tokens[c]), int(c)) for c in caption_index.tolist()], dtype=np.int64)
        pairs, back = np.unique(np.stack([audio_index, canon], axis=1), axis=0, return_inverse=True)
        if pairs.shape[0] < audio_index.size:
            return self.loss_at(tokens, pairs[:, 0], pairs[:, 1])[back.reshape(-1)]
        out = np.empty(audio_index.size, dtype=np.float32)
        ranks = self.rank_of[audio_index]
        T_of = np.array([len(tokens[c]) - 1 for c in caption_index], dtype=np.int64)
        chunk_of = np.empty_like(ranks)
        for T in np.unique(T_of):
            sel = T_of == T
            starts = np.array([c[0] for c in self._chunks(int(T))])
            chunk_of[sel] = np.searchsorted(starts, ranks[sel], side="right") - 1
        prefixes: dict[int, Prefix] = {}
        with torch.inference_mode():

            def prefix(c: int) -> Prefix:
                if c not in prefixes:
                    tok = torch.tensor(tokens[c], dtype=torch.long, device=self.device)[None]
                    prefixes[c] = self.fast.prefix(tok[:, :-1])
                return prefixes[c]

            order = np.lexsort((caption_index, ranks, chunk_of, T_of))
            key = np.stack([T_of[order], chunk_of[order]], axis=1)
            bounds = np.flatnonzero((key[1:] != key[:-1]).any(axis=1)) + 1
            for grp in np.split(order, bounds):
                T = int(T_of[grp[0]])
                a0, a1, S, padded = self._chunks(T)[int(chunk_of[grp[0]])]
                per = a1 - a0 if self.max_rows is None else max(1, self.max_rows // T)
                for g0 in range(0, grp.size, per):
                    sel = grp[g0 : g0 + per]
                    rows, caps = ranks[sel], caption_index[sel]
                    if sel.size == 1 and a1 - a0 > 1:  # a neighbour along (its loss is dropped)
                        rows = np.append(rows, rows[0] + 1 if rows[0] + 1 < a1 else rows[0] - 1)
                        caps = np.append(caps, caps[0])
                    ps = [prefix(int(c)) for c in caps]
                    pre = Prefix(torch.cat([p.x for p in ps]), torch.cat([p.q for p in ps]))
                    target = torch.tensor([tokens[int(c)][1:] for c in caps], dtype=torch.long, device=self.device)
                    r = torch.as_tensor(rows, device=self.device)
                    mask = self.mask[r, :S] if padded else None
                    losses = self.fast.losses(pre, self._kv(r, S), mask, target).cpu().numpy()
                    out[sel] = losses[: sel.size]
        return out

    def loss_pairs(self, audio_index: list[int], tokens: list[list[int]]) -> np.ndarray:
        """Losses (P,) float32 of listed pairs: audio_index[p] (position in the frames given
        to the constructor) with tokens[p]. Same numerics as `loss_matrix` (the same fast
        forward, here over batches of different captions, right-padded)."""
        P = len(tokens)
        out = np.empty(P, dtype=np.float32)
        if P == 0:
            return out
        rows = self.rank_of[np.asarray(audio_index, dtype=np.int64)]
        lengths = np.array([len(t) for t in tokens])
        p_order = np.lexsort((lengths, rows))
        size = self.pairs_per_batch
        if self.max_rows is not None:
            size = max(1, min(size, self.max_rows // int(lengths.max())))
        with torch.inference_mode():
            for p0 in range(0, P, size):
                idx = p_order[p0 : p0 + size]
                r = torch.as_tensor(rows[idx], device=self.device)
                S = int(self.lens[rows[idx]].max())
                T = int(lengths[idx].max())
                tok = torch.full((len(idx), T), self.pad_id, dtype=torch.long)
                for j, i in enumerate(idx):
                    tok[j, : len(tokens[i])] = torch.tensor(tokens[i])
                tok = tok.to(self.device)
                mask = self.mask[r, :S]
                prefix = self.fast.prefix(tok[:, :-1])
                losses = self.fast.losses(
                    prefix, self._kv(r, S), mask if bool(mask.any()) else None, tok[:, 1:], self.pad_id
                )
                out[idx] = losses.cpu().numpy()
        return out

    def _module_loss_matrix(self, tokens: list[list[int]]) -> np.ndarray:
        """The plain-module path this class used before `FastDecoder`: `pair_loss_memory`
        (the whole nn.TransformerDecoder, bf16 through autocast) for one caption against
        chunks of pairs_per_batch audios. A reference for tests and jobs/bench_scoring.py."""
        m = len(tokens)
        out = np.empty((self.n_audios, m), dtype=np.float32)
        with torch.inference_mode(), self.autocast:
            for j in range(m):
                tok = torch.tensor(tokens[j], dtype=torch.long, device=self.device)[None]
                for a0 in range(0, self.n_audios, self.pairs_per_batch):
                    a1 = min(a0 + self.pairs_per_batch, self.n_audios)
                    S = int(self.lens[a1 - 1])
                    losses = pair_loss_memory(
                        self.model, self.memory[a0:a1, :S], self.mask[a0:a1, :S], tok.expand(a1 - a0, -1), self.pad_id
                    )
                    out[self.order[a0:a1], j] = losses.float().cpu().numpy()
        return out


# --------------------------------------------------------------------------------------
# bf16 screening, fp32 decisions ("bf16-refined")
# --------------------------------------------------------------------------------------

REFINE_MARGIN = 0.01
"""Default bound on bf16's loss error, relative to the loss: measured at most 3.4e-3 (99.99%
of pairs below 2.4e-3) over 288,000 pairs of the demo checkpoint, so about 3x headroom; a
margin of 0.005 instead re-scores 8.2% of those pairs rather than 9.0% (docs/benchmarks.md)."""


def _window(P: np.ndarray, D: np.ndarray, k: int) -> np.ndarray:
    """Scores P (Q, C) known to within +-D (Q, C) -> bool (Q, C): per query (row), every
    candidate that could be among its k smallest true scores, i.e. whose lower bound P - D is
    at most the k-th smallest upper bound P + D of its row. The true top k of a row is inside
    (the k-th smallest true score is at most the k-th smallest upper bound), and a candidate
    outside lies strictly above every candidate of the true top k."""
    k = min(k, P.shape[1])
    if k < 1 or P.size == 0:
        return np.zeros(P.shape, dtype=bool)
    kth = np.partition(P + D, k - 1, axis=1)[:, k - 1 : k]
    return (P - D) <= kth


def refine_block(
    L: np.ndarray,
    rescore,
    k: int,
    margin: float = REFINE_MARGIN,
    stat_rows: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """bf16 losses of a block (N audios x m captions) -> the block with fp32 losses on every
    pair that decides a top-k list or a caption's min/max, so that `score_block` gives the
    lists fp32 gives (up to fp32's own last-bit rounding), while most pairs stay bf16.

    L (N, m) bf16-scored losses; rescore(rows, cols) -> fp32 losses of the pairs (rows[i],
    cols[i]) (int arrays); margin: the assumed bound on |bf16 - fp32| as a fraction of the
    loss. stat_rows: the audios the caption min/max run over (reindex's estimated min/max),
    None for all N. Two rescoring rounds:
      1. per caption: its T2A window (`_window` with k), and the windows of its min and max
         over stat_rows; then min and max are exact, and so are the min-max spans;
      2. per audio: its raw A2T window and its min-max A2T window over the block's captions
         (min-max bounds: D / span), the pairs of round 1 counting as exact (D = 0).
    A caption whose min equals its max (span 0) has undefined min-max bounds: its pairs
    count as candidates of every min-max window.

    Returns (refined L float64, info): info = {pairs, rescored, max_rel_err} where
    max_rel_err is the largest |bf16 - fp32| / |fp32| seen on the rescored pairs: the
    guarantee assumes it stays below margin everywhere.
    """
    if margin <= 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    L = np.array(L, dtype=np.float64)
    N, m = L.shape
    D = margin * np.abs(L)
    seen, n_rescored = 0.0, 0

    def fix(mask: np.ndarray) -> None:
        nonlocal seen, n_rescored
        rows, cols = np.nonzero(mask & (D > 0))
        if rows.size == 0:
            return
        exact = np.asarray(rescore(rows, cols), dtype=np.float64)
        assert exact.shape == rows.shape, f"rescore returned {exact.shape}, expected {rows.shape}"
        rel = np.abs(L[rows, cols] - exact) / np.maximum(np.abs(exact), 1e-12)
        seen = max(seen, float(rel.max()))
        n_rescored += rows.size
        L[rows, cols] = exact
        D[rows, cols] = 0.0

    rows_s = np.arange(N) if stat_rows is None else np.asarray(stat_rows, dtype=np.int64)
    Ls, Ds = L[rows_s], D[rows_s]
    t2a = _window(L.T, D.T, k).T
    lo = np.zeros_like(t2a)
    hi = np.zeros_like(t2a)
    lo[rows_s] = _window(Ls.T, Ds.T, 1).T
    hi[rows_s] = (Ls + Ds) >= (Ls - Ds).max(axis=0, keepdims=True)
    fix(t2a | lo | hi)
    mn, mx = L[rows_s].min(axis=0), L[rows_s].max(axis=0)
    span = mx - mn
    with np.errstate(divide="ignore", invalid="ignore"):
        S = np.where(span > 0, (L - mn) / np.where(span > 0, span, 1.0), 0.0)
        DS = np.where(span > 0, D / np.where(span > 0, span, 1.0), np.where(D > 0, np.inf, 0.0))
    fix(_window(L, D, k) | _window(S, DS, k))
    return L, {"pairs": int(N * m), "rescored": n_rescored, "max_rel_err": seen}


class BlockScorer:
    """The losses score_matrix and reindex rank, for one fixed audio index.

    precision "fp32" or "bf16": `PairScorer` at that precision. "bf16-refined": a bf16
    `PairScorer` screens every pair and an fp32 one re-scores the pairs that decide the
    block's top-k lists and caption min/max (`refine_block`): the rankings of fp32 at close
    to bf16's speed once the index is large (docs/benchmarks.md).
    """

    def __init__(self, model, pad_id, frames, device="cpu", precision="fp32", pairs_per_batch=4096, margin=REFINE_MARGIN):
        self.refined = precision == "bf16-refined"
        self.margin = margin
        self.scorer = PairScorer(model, pad_id, frames, device, "bf16" if self.refined else precision, pairs_per_batch)
        self.exact = PairScorer(model, pad_id, frames, device, "fp32", pairs_per_batch) if self.refined else None

    def losses(self, tokens: list[list[int]], k: int, stat_rows=None) -> tuple[np.ndarray, dict | None]:
        """Token lists of m captions -> (losses (N, m), refine info or None)."""
        L = self.scorer.loss_matrix(tokens)
        if not self.refined:
            return L, None

        def rescore(rows, cols):
            return self.exact.loss_at(tokens, rows, cols)

        return refine_block(L, rescore, k, self.margin, stat_rows)


def refine_summary(margin: float, pairs: int, rescored: int, max_rel_err: float) -> dict:
    """metrics.json's "refine" entry; logs a warning when bf16's error exceeded the margin."""
    if max_rel_err > margin:
        log.warning(
            "bf16-refined: a rescored pair's bf16 loss was off by %.2e of its fp32 loss, above refine_margin "
            "%.2e: the top-k lists may differ from fp32's. Raise refine_margin (or use precision fp32).",
            max_rel_err, margin,
        )
    return {
        "margin": margin,
        "rescored_pairs": int(rescored),
        "rescored_share": round(rescored / max(pairs, 1), 5),
        "max_rel_err_seen": float(f"{max_rel_err:.3e}"),
        "within_margin": bool(max_rel_err <= margin),
    }


def reference_loss_matrix(model: CaptionDecoder, pad_id: int, frames: list[np.ndarray], tokens: list[list[int]]) -> np.ndarray:
    """The plain loop: one `pair_loss` call per (audio, caption) pair. For tests."""
    model.eval()
    out = np.empty((len(frames), len(tokens)), dtype=np.float32)
    with torch.inference_mode():
        for i, f in enumerate(frames):
            x = torch.tensor(np.asarray(f, np.float32))[None]
            for j, t in enumerate(tokens):
                out[i, j] = float(pair_loss(model, x, None, torch.tensor([t]), pad_id)[0])
    return out


# --------------------------------------------------------------------------------------
# Inputs and their checks
# --------------------------------------------------------------------------------------


def check_inputs(audio, audio_desc: str, table: pa.Table, captions_desc: str):
    """(caption ids, texts, ground-truth audio or None, problems) of a caption table against
    an audio index: bad embeddings, an empty index or caption set, duplicate caption ids,
    captions whose ground-truth audio is not in the index. Shared by score_matrix and perturb."""
    bad = [f"audio {a}: {why}" for a, why in check_embeddings(audio, "index")]
    if not audio.audio_ids:
        bad.append(f"the audio index {audio_desc} is empty")
    cids = table.column("caption_id").to_pylist()
    texts = table.column("text").to_pylist()
    gts = table.column("audio_id").to_pylist()
    if not cids:
        bad.append(f"the caption set {captions_desc} is empty")
    dups = duplicate_ids(cids)
    if dups:
        bad.append(f"duplicate caption ids: {dups[:10]}")
    index = set(audio.audio_ids)
    missing = [(c, a) for c, a in zip(cids, gts, strict=True) if a is not None and a not in index]
    if missing:
        bad.append(
            f"{len(missing)} caption(s) whose ground-truth audio is not in the index, e.g. "
            f"{missing[:5]}: add those audios to the index or select matching subsets"
        )
    return cids, texts, gts, bad


def tokenize(tok: WordTokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    """The scorer's tokenisation: bos .. eos, cut to max_tokens keeping eos."""
    out = []
    for t in texts:
        ids = tok.encode(t)
        if len(ids) > max_tokens:
            ids = ids[: max_tokens - 1] + [tok.eos_id]
        out.append(ids)
    return out


def load_inputs(audio_uri: str, audio_subsets, captions_uri: str, caption_subsets, tok: WordTokenizer, max_tokens: int):
    """(audio EmbeddingSet, caption ids, token lists, ground-truth audio or None, texts).
    Raises BadInputError naming the items, before any scoring."""
    audio = read_embeddings(audio_uri, audio_subsets)
    table = read_captions(captions_uri, caption_subsets)
    cids, texts, gts, bad = check_inputs(
        audio, f"{audio_uri} (subsets {audio_subsets})", table, f"{captions_uri} (subsets {caption_subsets})"
    )
    empty = [c for c, t in zip(cids, texts, strict=True) if not normalize(t or "")]
    if empty:
        bad.append(f"captions empty after normalisation: {empty[:10]}")
    if bad:
        raise BadInputError("score_matrix refused its inputs, nothing was scored:\n  " + "\n  ".join(bad))
    return audio, cids, tokenize(tok, texts, max_tokens), gts, texts


# --------------------------------------------------------------------------------------
# The Ray Data actor
# --------------------------------------------------------------------------------------


def _ipc(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue()


def _from_ipc(b: bytes) -> pa.Table:
    return pa.ipc.open_stream(io.BytesIO(b)).read_all()


class ScoreActor:
    """One block of captions x every audio -> block result (stats, top-k, plot rows)."""

    def __init__(self, cfg_dict: dict, probe_audios: list[str], corner_captions: list[str]):
        from aacray import checkpoint as ckpt_lib
        from aacray.config import ScoreConfig, from_dict

        cfg = from_dict(ScoreConfig, cfg_dict)
        use_gpu = cfg.actors.num_gpus > 0 and torch.cuda.is_available()
        device = "cuda" if use_gpu else "cpu"
        if not use_gpu:
            torch.set_num_threads(max(1, int(cfg.actors.num_cpus)))
        model, tok, _ = ckpt_lib.load(cfg.checkpoint, device)
        audio = read_embeddings(cfg.audio, cfg.audio_subsets)
        self.audio_ids = audio.audio_ids
        self.scorer = BlockScorer(
            model, tok.pad_id, audio.frames, device, cfg.precision, cfg.pairs_per_batch, cfg.refine_margin
        )
        self.k = cfg.k
        self.scores_uri = storage.join(cfg.output, "scores") if cfg.write_scores else None
        pos = {a: i for i, a in enumerate(self.audio_ids)}
        self.probe_idx = [pos[a] for a in probe_audios]
        self.corner_captions = set(corner_captions)
        self.blocks_uri = storage.join(cfg.output, BLOCKS)
        self.fail_on_block = cfg.fail_on_block

    def __call__(self, batch: dict) -> dict:
        """A batch of block rows (block, caption_id list, tokens list) -> one result file per
        block under `_blocks/` (skipped when it is already there: a resumed run)."""
        done = []
        for i in range(len(batch["block"])):
            block = int(batch["block"][i])
            path = block_path(self.blocks_uri, block)
            if not storage.exists(path):
                if block == self.fail_on_block:
                    raise RuntimeError(f"injected fault at block {block} (fail_on_block)")
                cids = [str(c) for c in batch["caption_id"][i]]
                tokens = [list(map(int, t)) for t in batch["tokens"][i]]
                storage.write_bytes(path, self.score(cids, tokens))
            done.append(block)
        return {"block": np.array(done, dtype=np.int64)}

    def score(self, cids: list[str], tokens: list[list[int]]) -> bytes:
        """One block: losses (N, m) -> stats, top-k lists, plot rows (a one-row Parquet)."""
        t0 = time.time()
        L, refined = self.scorer.losses(tokens, self.k)  # (N, m)
        res = score_block(L, self.audio_ids, cids, self.k)
        if self.scores_uri:
            key = hashlib.sha1("\x00".join(cids).encode()).hexdigest()[:20]
            n, m = L.shape
            t = pa.table(
                {
                    "audio_id": pa.array(np.repeat(np.array(self.audio_ids, dtype=object), m), pa.string()),
                    "caption_id": pa.array(np.tile(np.array(cids, dtype=object), n), pa.string()),
                    "loss": pa.array(L.reshape(-1), pa.float32()),
                }
            )
            buf = io.BytesIO()
            pq.write_table(t, buf)
            # a stable name per block: a retried block overwrites its own file
            storage.write_bytes(storage.join(self.scores_uri, f"block-{key}.parquet"), buf.getvalue())
        corner_cols = [j for j, c in enumerate(cids) if c in self.corner_captions]
        probe = pa.table(
            {
                "caption_id": pa.array(cids, pa.string()),
                **{f"probe{i}": pa.array(L[ai], pa.float32()) for i, ai in enumerate(self.probe_idx)},
            }
        )
        # typed columns: a block may hold none of the corner captions (an empty table must
        # still concatenate with the others)
        corner = pa.table(
            {
                "caption_id": pa.array([cids[j] for j in corner_cols], pa.string()),
                **{a: pa.array(L[i, corner_cols], pa.float32()) for i, a in enumerate(self.audio_ids[:CORNER])},
            }
        )
        row = pa.table(
            {
                "stats": [_ipc(pa.table(res.stats.columns()))],
                "t2a": [_ipc(pa.table(res.t2a.columns()))],
                "a2t_raw": [_ipc(pa.table(res.a2t_raw.columns()))],
                "a2t_minmax": [_ipc(pa.table(res.a2t_minmax.columns()))],
                "probe": [_ipc(probe)],
                "corner": [_ipc(corner)],
                "n_pairs": [L.size],
                "rescored": [refined["rescored"] if refined else 0],
                "max_rel_err": [refined["max_rel_err"] if refined else 0.0],
                "seconds": [time.time() - t0],
            }
        )
        buf = io.BytesIO()
        pq.write_table(row, buf)
        return buf.getvalue()


def block_path(blocks_uri: str, block: int) -> str:
    return storage.join(blocks_uri, f"block-{block:07d}.parquet")


class _A2TMerger:
    """Running per-audio top-k: parts are merged when they pile up (amortised)."""

    def __init__(self, kind: str, k: int, n_audios: int):
        self.kind, self.k, self.parts, self.rows, self.limit = kind, k, [], 0, max(4 * n_audios * k, 1 << 16)

    def add(self, t: TopK) -> None:
        self.parts.append(t)
        self.rows += len(t)
        if self.rows > self.limit:
            self.parts = [topk_merge(self.parts, self.k, self.kind)]
            self.rows = len(self.parts[0])

    def result(self) -> TopK:
        return topk_merge(self.parts, self.k, self.kind)


# --------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------


def run_score_matrix(cfg) -> dict:
    import ray
    import ray.data

    from aacray import checkpoint as ckpt_lib
    from aacray.config import dump_yaml, to_dict
    from aacray.runtime import init_ray

    t_start = time.time()
    model, tok, info = ckpt_lib.load(cfg.checkpoint)
    audio, cids, tokens, gts, texts = load_inputs(
        cfg.audio, cfg.audio_subsets, cfg.captions, cfg.caption_subsets, tok, model.cfg.max_len + 1
    )
    del model
    n, m = len(audio.audio_ids), len(cids)
    oov = sum(1 for t in tokens if tok.unk_id in t)
    log.info("score_matrix: %d audios x %d captions = %d pairs (%d captions hold unknown words)", n, m, n * m, oov)
    out = cfg.output
    # ground truth, probe audios for the loss curves, the heatmap corner
    sorted_audio = sorted(audio.audio_ids)
    has_gt = any(g is not None for g in gts)
    gt_of = dict(zip(cids, gts, strict=True))
    caps_of: dict[str, list[str]] = {}
    for c, g in zip(cids, gts, strict=True):
        if g is not None:
            caps_of.setdefault(g, []).append(c)
    probe_audios = [a for a in sorted_audio if a in caps_of][:N_CURVES] or sorted_audio[:N_CURVES]
    corner_audios = audio.audio_ids[:CORNER]
    corner_captions = [sorted(caps_of[a])[0] for a in corner_audios if a in caps_of] or sorted(cids)[:CORNER]

    # blocks: captions sorted by length (little padding), cut every caption_block_size
    order = sorted(range(m), key=lambda j: (len(tokens[j]), cids[j]))
    bs = cfg.caption_block_size
    blocks = [order[i : i + bs] for i in range(0, m, bs)]
    # a run is resumable when everything that shapes a block's result is unchanged
    fingerprint = hashlib.sha256(
        repr(
            (SCORER_VERSION, info, audio.audio_ids, [f.shape for f in audio.frames], cids, tokens, cfg.k, cfg.precision,
             cfg.pairs_per_batch, bs, cfg.write_scores, probe_audios, corner_captions,
             cfg.refine_margin if cfg.precision == "bf16-refined" else None)
        ).encode()
    ).hexdigest()
    blocks_uri = storage.join(out, BLOCKS)
    run_file = storage.join(blocks_uri, "_run.json")
    resuming = storage.exists(run_file) and storage.read_json(run_file).get("fingerprint") == fingerprint
    if not resuming:
        storage.remove(blocks_uri)
    storage.begin_output(out, TABLES + ([] if resuming else ["scores"]))
    storage.write_text(storage.join(out, "config.yaml"), dump_yaml(cfg))
    storage.write_json(run_file, {"fingerprint": fingerprint, "blocks": len(blocks)})
    done = {i for i in range(len(blocks)) if storage.exists(block_path(blocks_uri, i))} if resuming else set()
    if done:
        log.info("score_matrix: resuming: %d of %d blocks already scored, skipped", len(done), len(blocks))

    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    t_score = time.time()
    # longest captions first (blocks are cut from captions sorted by length): the costliest
    # blocks start early and the short ones fill in at the end, so actors finish together
    pending = [i for i in reversed(range(len(blocks))) if i not in done]
    if pending:
        # 1. one row per block of captions
        ds = ray.data.from_items(
            [
                {"block": i, "caption_id": [cids[j] for j in blocks[i]], "tokens": [np.array(tokens[j], np.int32) for j in blocks[i]]}
                for i in pending
            ],
            override_num_blocks=len(pending),
        )
        # 2. each block x every audio on the actor pool; results land in _blocks/
        ds = ds.map_batches(
            ScoreActor,
            fn_constructor_kwargs={"cfg_dict": to_dict(cfg), "probe_audios": probe_audios, "corner_captions": corner_captions},
            batch_size=1,
            batch_format="numpy",
            # one block at a time per actor: a block is seconds to minutes of work, and a
            # block queued behind another on a busy actor would idle a free one
            compute=ray.data.ActorPoolStrategy(size=cfg.actors.num_actors, max_tasks_in_flight_per_actor=1),
            num_gpus=cfg.actors.num_gpus,
            num_cpus=cfg.actors.num_cpus,
        )
        finished = {int(r["block"]) for r in ds.iter_rows()}
        if finished != set(pending):
            raise RuntimeError(f"blocks missing after scoring: {sorted(set(pending) - finished)[:10]}")
    score_seconds = time.time() - t_score
    scored = n * sum(len(blocks[i]) for i in pending)
    # 3. reduce the block results
    stats_parts, t2a_parts, probe_parts, corner_parts = [], [], [], []
    raw = _A2TMerger("a2t_raw", cfg.k, n)
    mm = _A2TMerger("a2t_minmax", cfg.k, n)
    n_pairs, rescored, max_rel_err = 0, 0, 0.0
    for i in range(len(blocks)):
        fs, path = storage.get_fs(block_path(blocks_uri, i))
        with fs.open(path, "rb") as f:
            row = pq.read_table(f).to_pylist()[0]
        stats_parts.append(_from_ipc(row["stats"]))
        t2a_parts.append(TopK.from_columns(_from_ipc(row["t2a"]), "t2a"))
        raw.add(TopK.from_columns(_from_ipc(row["a2t_raw"]), "a2t_raw"))
        mm.add(TopK.from_columns(_from_ipc(row["a2t_minmax"]), "a2t_minmax"))
        probe_parts.append(_from_ipc(row["probe"]))
        corner_parts.append(_from_ipc(row["corner"]))
        n_pairs += int(row["n_pairs"])
        rescored += int(row["rescored"])
        max_rel_err = max(max_rel_err, float(row["max_rel_err"]))
    score_seconds = time.time() - t_score
    if n_pairs != n * m:
        raise RuntimeError(f"scored {n_pairs} pairs, expected {n} x {m} = {n * m}")
    stats = CaptionStats.from_columns(pa.concat_tables(stats_parts))
    result = BlockResult(stats, topk_merge(t2a_parts, cfg.k, "t2a"), raw.result(), mm.result())

    # 4. tables, metrics, plots; the manifest last
    storage.write_table(out, "caption_stats", pa.table(result.stats.columns()))
    storage.write_table(out, "topk_t2a", pa.table(result.t2a.columns()))
    storage.write_table(out, "topk_a2t", pa.table(result.a2t_minmax.columns()))
    storage.write_table(out, "topk_a2t_raw", pa.table(result.a2t_raw.columns()))
    metrics: dict = {}
    if has_gt and cfg.k >= 10:
        metrics = retrieval_metrics(result.t2a, result.a2t_raw, result.a2t_minmax, gt_of)
    metrics.update(
        {
            "n_audios": n,
            "n_captions": m,
            "n_pairs": n_pairs,
            "captions_with_unknown_words": oov,
            "pairs_scored_this_run": scored,
            "pairs_per_s": round(scored / max(score_seconds, 1e-9), 1),
            "score_seconds": round(score_seconds, 2),
            "blocks": len(blocks),
            "blocks_skipped_on_resume": len(done),
            "scorer": {"version": SCORER_VERSION, "precision": cfg.precision},
            "checkpoint": info,
        }
    )
    if cfg.precision == "bf16-refined":
        metrics["scorer"]["refine"] = refine_summary(cfg.refine_margin, n_pairs, rescored, max_rel_err)
    storage.write_json(storage.join(out, "metrics.json"), metrics)
    plots = []
    if cfg.plots:
        from aacray.plots import plot_heatmap, plot_loss_curves

        probe = pa.concat_tables(probe_parts)
        plots.append(plot_loss_curves(out, probe, probe_audios, caps_of, stats))
        corner = pa.concat_tables(corner_parts)
        plots.append(plot_heatmap(out, corner, corner_audios, corner_captions, gt_of))
    tables = TABLES + (["scores"] if cfg.write_scores else [])
    storage.commit_output(out, "score_matrix", {"metrics": "metrics.json", "plots": plots, "blocks_skipped_on_resume": len(done)}, tables)
    storage.remove(blocks_uri)
    # Recall@10 needs ground truth and k >= 10; otherwise the output holds rankings only
    table = format_table(metrics) if "t2a" in metrics else "(no ground truth or k < 10: rankings only)"
    print(table, flush=True)
    return {
        "output": out,
        "n_audios": n,
        "n_captions": m,
        "n_pairs": n_pairs,
        "pairs_per_s": metrics["pairs_per_s"],
        "wall_seconds": round(time.time() - t_start, 1),
        **{k: metrics[k] for k in ("t2a", "a2t_raw", "a2t_minmax") if k in metrics},
    }


def format_table(metrics: dict) -> str:
    """A table like the paper's Table 2 (R@1/5/10 for T2A and A2T, raw and min-max)."""

    def f(v):
        return "  -  " if v is None else f"{v:.3f}"

    t, r, mm = metrics["t2a"], metrics["a2t_raw"], metrics["a2t_minmax"]
    lines = [
        f"Retrieval on {metrics['n_audios']} audios x {metrics['n_captions']} captions ({metrics['n_pairs']} pairs)",
        "                 Text-to-audio              Audio-to-text",
        "                 R@1    R@5    R@10  mAP@10 R@1    R@5    R@10",
        f"raw loss         {f(t['R@1'])}  {f(t['R@5'])}  {f(t['R@10'])} {f(t['mAP@10'])}  {f(r['R@1'])}  {f(r['R@5'])}  {f(r['R@10'])}",
        f"min-max (A2T)*   {'':5}  {'':5}  {'':5} {'':5}  {f(mm['R@1'])}  {f(mm['R@5'])}  {f(mm['R@10'])}",
        "* captions' losses min-max scaled over the audio index (paper 4.2)",
    ]
    return "\n".join(lines)
