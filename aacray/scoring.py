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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from aacray import storage
from aacray.embeddings import read_captions, read_embeddings
from aacray.errors import BadInputError
from aacray.retrieval import (
    BlockResult,
    CaptionStats,
    TopK,
    retrieval_metrics,
    score_block,
    topk_merge,
)
from aacray.scorer import BlockScorer, check_inputs, refine_summary, tokenize
from aacray.text import WordTokenizer, normalize

log = logging.getLogger("aacray.scoring")

TABLES = ["caption_stats", "topk_t2a", "topk_a2t", "topk_a2t_raw"]
BLOCKS = "_blocks"  # per-block results of an unfinished run (resume reads them)
# The scorer's numerics: recorded in metrics.json and part of the resume fingerprint, so a
# run resumed after an upgrade that changes float rounding does not mix two scorers' blocks.
# "fastdecode-1": aacray.scorer.FastDecoder (cached audio K/V, per-caption prefix, fixed CPU
# chunks); the name is kept while the numerics are unchanged.
SCORER_VERSION = "fastdecode-1"
CORNER = 32  # heatmap side
N_CURVES = 3  # queries in the loss-curve figure



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

    def __init__(self, cfg_dict: dict, probe_audios: list[str], corner_captions: list[str], fail_on_block: int | None = None):
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
            model, tok.pad_id, audio.frames, device, cfg.scorer.precision, cfg.scorer.pairs_per_batch, cfg.scorer.refine_margin
        )
        self.k = cfg.k
        self.scores_uri = storage.join(cfg.output, "scores") if cfg.write_scores else None
        pos = {a: i for i, a in enumerate(self.audio_ids)}
        self.probe_idx = [pos[a] for a in probe_audios]
        self.corner_captions = set(corner_captions)
        self.blocks_uri = storage.join(cfg.output, BLOCKS)
        self.fail_on_block = fail_on_block  # a test's fault injection, never a config key

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


def run_score_matrix(cfg, _fail_on_block: int | None = None) -> dict:
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
            (SCORER_VERSION, info, audio.audio_ids, [f.shape for f in audio.frames], cids, tokens, cfg.k, cfg.scorer.precision,
             cfg.scorer.pairs_per_batch, bs, cfg.write_scores, probe_audios, corner_captions,
             cfg.scorer.refine_margin if cfg.scorer.precision == "bf16-refined" else None)
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
            fn_constructor_kwargs={"cfg_dict": to_dict(cfg), "probe_audios": probe_audios, "corner_captions": corner_captions,
                                   "fail_on_block": _fail_on_block},
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
            "scorer": {"version": SCORER_VERSION, "precision": cfg.scorer.precision},
            "checkpoint": info,
        }
    )
    if cfg.scorer.precision == "bf16-refined":
        metrics["scorer"]["refine"] = refine_summary(cfg.scorer.refine_margin, n_pairs, rescored, max_rel_err)
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
