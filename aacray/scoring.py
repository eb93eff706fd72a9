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
Numerics: fp32 by default; bf16 autocast as an option; the loss is always reduced in fp32.
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


class BadInputError(ValueError):
    """Inputs score_matrix refuses before scoring; the message names the items."""


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

    def loss_pairs(self, audio_index: list[int], tokens: list[list[int]]) -> np.ndarray:
        """Losses (P,) float32 of listed pairs: audio_index[p] (position in the frames given
        to the constructor) with tokens[p]. Same numerics as `loss_matrix` (the same fast
        forward, here over batches of different captions, right-padded)."""
        P = len(tokens)
        out = np.empty(P, dtype=np.float32)
        if P == 0:
            return out
        rank_of = np.empty(self.n_audios, dtype=np.int64)
        rank_of[self.order] = np.arange(self.n_audios)
        rows = rank_of[np.asarray(audio_index, dtype=np.int64)]
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
        self.scorer = PairScorer(model, tok.pad_id, audio.frames, device, cfg.precision, cfg.pairs_per_batch)
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
        L = self.scorer.loss_matrix(tokens)  # (N, m)
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
             cfg.pairs_per_batch, bs, cfg.write_scores, probe_audios, corner_captions)
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
    n_pairs = 0
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
