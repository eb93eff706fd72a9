"""Stage (the main job): score the audio x caption cross product, reduce, rank, evaluate.

Phases (the skeleton of aacray/stage.py), one function each:
1. plan (`plan_score_matrix` -> `ScorePlan`): read and check the inputs in the driver, cut
   the captions into blocks, choose the plots' queries, add up what one actor will hold;
2. set up (`_set_up` -> `Run`): refuse a plan no actor can hold (`stage.check_actor_memory`),
   start Ray and refuse a pool no node can host (`stage.start_ray`), with `candidates` not
   exact choose the pairs (`attach_candidates`: aacray/candidates.py), resume an unfinished
   run or begin the output;
3. run (`_run_blocks`): every pending block x every audio on the actor pool (`ScoreActor`),
   one result file per block under `_blocks/`;
4. reduce (`_reduce` -> `Reduced`): the blocks' stats, top-k lists and plot rows, merged;
5. commit (`_commit`): tables, metrics.json, plots, the DCASE task 6b submission
   (`dcase_t2a.csv`), the manifest last; `_blocks/` removed.

Blocks. The caption set is cut into blocks of `caption_block_size` captions; each block is
scored against EVERY audio of the index by one actor of a Ray Data pool. With listed
candidates (`candidates: shortlist` or a pairs file) a block holds about as many pairs
instead (caption_block_size x N), each caption against its own audios
(`BlockScorer.loss_pairs`, `retrieval.score_pairs_block`); a caption's pairs all sit in one
block, so what follows holds alike. So a block's
per-caption min/max and text-to-audio top-k are final when it finishes, and only the
per-audio audio-to-text candidates (raw and min-max) are merged across blocks, by the
driver. With `minmax_ties: authors` the min-max candidates also keep every caption tied at
an audio's smallest score, and the driver applies the authors' order once, after the merge
(`retrieval.authors_tie_order`). The full N x M matrix never exists anywhere unless
`write_scores` asks for it (each actor then writes its block's rows itself,
`write_scores_block`). Shapes follow the legend of aacray/scorer.py: N audios, M captions,
m of one block, S frames, D width.

Resume. A block's result lands in `_blocks/` as it finishes; a rerun whose fingerprint
(everything that shapes a block's result) matches skips the blocks already there.

Memory model: what one actor holds (`scorer.scorer_memory`; logged and checked before any
actor starts against `actors.memory_gb` or the node's memory, on a GPU pool each part
against the memory that holds it, `scorer.memory_places`):
- the model (~12M parameters at the paper's size) and the scorer's weight copies;
- the projected audio index, N x S x D fp32: 3.2 GB for 100k audios of 31 frames, D 256;
- the per-layer cross-attention key/value cache, 2 x n_layers x N x S x D in the compute
  dtype: 38 GB fp32 for the same 100k audios, the part that bounds N;
- with bf16-refined, two scorers: a bf16 one that screens and an fp32 one that decides
  (the index twice, the cache 1.5 times fp32's);
- the frames read at start-up (N x S x 768 float32) while the scorers are built, one
  block of losses (N x caption_block_size) with the ranking's work arrays, and one
  forward's activations (`scorer.forward_memory`: on a GPU min(pairs_per_batch, N) pairs
  at once, 2.4 GB fp32 at Clotho's evaluation size, mostly the logits).
The driver holds N x k and M x k top-k rows and M caption stats (with minmax_ties authors,
also each audio's captions tied at its smallest min-max score: the captions it is the best
audio for, M / N on average, plus every caption whose loss does not depend on the audio).
Cost model: pairs x FLOPs per pair / device rate (README).

Numerics (`scorer.precision`): fp32 by default; bf16 (the decoder layers' matmuls on bf16
weight copies, the classifier and the loss in fp32; no autocast); bf16-refined
(`BlockScorer`, `refine_block`): bf16 for every pair, fp32 again for the pairs that decide
the block's top-k lists and caption min/max, so the tables and metrics are fp32's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from aacray import checkpoint as ckpt_lib
from aacray import storage
from aacray.candidates import DESCRIPTIONS, build_candidates
from aacray.config import ScoreConfig, from_dict, to_dict
from aacray.embeddings import read_captions, read_embeddings
from aacray.errors import BadInputError
from aacray.plots import plot_heatmap, plot_loss_curves
from aacray.retrieval import (
    DCASE_TOP_N,
    BlockResult,
    CaptionStats,
    TopK,
    authors_tie_order,
    dcase_task6b_csv,
    retrieval_metrics,
    score_block,
    score_pairs_block,
    topk_merge,
)
from aacray.runtime import joins_cluster
from aacray.scorer import BlockScorer, check_inputs, over_long, refine_summary, scorer_memory
from aacray.shortlist import Candidates
from aacray.stage import (
    Output,
    PoolWork,
    actor_name,
    actor_setup,
    check_actor_memory,
    map_actors,
    start_ray,
)
from aacray.text import WordTokenizer, normalize

log = logging.getLogger("aacray.scoring")

JOB = "score_matrix"
TABLES = ["caption_stats", "topk_t2a", "topk_a2t", "topk_a2t_raw"]
BLOCKS = "_blocks"  # per-block results of an unfinished run (resume reads them)
DCASE_FILE = "dcase_t2a.csv"  # the DCASE task 6b submission (`dcase_export`)
# The scorer's numerics: recorded in metrics.json and part of the resume fingerprint, so a
# run resumed after an upgrade that changes float rounding does not mix two scorers' blocks.
# "fastdecode-1": aacray.scorer.FastDecoder (cached audio K/V, per-caption prefix, fixed CPU
# chunks); the name is kept while the numerics are unchanged.
SCORER_VERSION = "fastdecode-1"
CORNER = 32  # heatmap side
N_CURVES = 3  # queries in the loss-curve figure
WAYS_OUT = (
    "fewer audios per job (audio_subsets, or split the index across jobs); scorer.precision bf16 "
    "(half the key/value cache of fp32; bf16-refined holds a bf16 and an fp32 scorer); an actor "
    "with more memory (actors.memory_gb, a larger node or GPU); a smaller caption_block_size; "
    "on a GPU a smaller scorer.pairs_per_batch (the `forward` part grows with it)"
)


# --------------------------------------------------------------------------------------
# 1. Plan
# --------------------------------------------------------------------------------------


def load_inputs(audio_uri: str, audio_subsets, captions_uri: str, caption_subsets, tok: WordTokenizer, max_tokens: int):
    """(audio EmbeddingSet, caption ids, token lists, ground-truth audio or None, texts).
    Raises BadInputError naming the items, before any scoring: bad or missing audios,
    duplicate or empty captions, and captions longer than the decoder takes (max_tokens,
    bos and eos included), which are refused rather than cut."""
    audio = read_embeddings(audio_uri, audio_subsets)
    table = read_captions(captions_uri, caption_subsets)
    cids, texts, gts, bad = check_inputs(
        audio, f"{audio_uri} (subsets {audio_subsets})", table, f"{captions_uri} (subsets {caption_subsets})"
    )
    empty = [c for c, t in zip(cids, texts, strict=True) if not normalize(t or "")]
    if empty:
        bad.append(f"captions empty after normalisation: {empty[:10]}")
    # uncut: a caption over the limit is refused here, so none is cut (`scorer.tokenize`)
    tokens = [tok.encode(t or "") for t in texts]
    long = over_long(cids, tokens, max_tokens)
    if long:
        bad.append(long)
    if bad:
        raise BadInputError("score_matrix refused its inputs, nothing was scored:\n  " + "\n  ".join(bad))
    return audio, cids, tokens, gts, texts


@dataclass
class ScorePlan:
    """What the driver settles before any actor starts; caption positions index `caption_ids`."""

    cfg: ScoreConfig
    checkpoint_info: dict
    audio_ids: list[str]
    frame_shapes: list[tuple[int, ...]]
    caption_ids: list[str]
    tokens: list[list[int]]
    gt_of: dict[str, str | None]  # caption -> its audio (None: an external caption)
    texts: list[str]  # caption texts, as given (the DCASE export's queries)
    file_names: dict[str, str] | None  # audio -> file name for the DCASE export (None: none)
    dcase_skip: str | None  # why the DCASE export is not written (None: it is)
    caps_of: dict[str, list[str]]  # audio -> its captions
    blocks: list[list[int]]  # caption positions of each block, cut from captions sorted by length
    probe_audios: list[str]  # the loss-curve figure's queries
    corner_audios: list[str]  # the heatmap's rows and columns
    corner_captions: list[str]
    oov: int  # captions holding unknown words
    need: dict[str, int]  # bytes one actor holds, by part (`scorer_memory`)
    skip_ids: set[int]  # bos, eos, pad: not words of a caption (the profile shortlist)
    cands: Candidates | None = None  # the pairs to score (`candidates` not exact); None: all
    cand_info: dict | None = None  # metrics.json's "candidates" entry
    described: pa.Table | None = None  # the shortlist's `descriptions` table

    def n_pairs_of(self, block: int) -> int:
        """Pairs block `block` scores."""
        if self.cands is None:
            return self.n_audios * len(self.blocks[block])
        return int(self.cands.per_caption[self.blocks[block]].sum())

    @property
    def n_audios(self) -> int:
        return len(self.audio_ids)

    @property
    def n_captions(self) -> int:
        return len(self.caption_ids)

    def fingerprint(self) -> str:
        """A run is resumable when everything that shapes a block's result is unchanged."""
        c = self.cfg
        return hashlib.sha256(
            repr(
                (SCORER_VERSION, self.checkpoint_info, self.audio_ids, self.frame_shapes, self.caption_ids, self.tokens,
                 c.k, c.scorer.precision, c.scorer.pairs_per_batch, c.caption_block_size, c.write_scores,
                 self.probe_audios, self.corner_captions, c.minmax_ties,
                 c.scorer.refine_margin if c.scorer.precision == "bf16-refined" else None, c.candidates,
                 None if self.cands is None else (to_dict(c.shortlist), _digest(self.cands.start), _digest(self.cands.audio)))
            ).encode()
        ).hexdigest()


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def plan_score_matrix(cfg: ScoreConfig) -> ScorePlan:
    """Phase 1: read and check the inputs, cut the blocks, size one actor."""
    model, tok, info = ckpt_lib.load(cfg.checkpoint, task=cfg.task)
    audio, cids, tokens, gts, texts = load_inputs(
        cfg.audio, cfg.audio_subsets, cfg.captions, cfg.caption_subsets, tok, model.cfg.max_tokens
    )
    n, m = len(audio.audio_ids), len(cids)
    oov = sum(1 for t in tokens if tok.unk_id in t)
    log.info("score_matrix: %d audios x %d captions = %d pairs (%d captions hold unknown words)", n, m, n * m, oov)
    caps_of: dict[str, list[str]] = {}
    for c, g in zip(cids, gts, strict=True):
        if g is not None:
            caps_of.setdefault(g, []).append(c)
    probe_audios, corner_audios, corner_captions = _plot_queries(audio.audio_ids, cids, caps_of)
    # blocks: captions sorted by length (little padding), cut every caption_block_size
    order = sorted(range(m), key=lambda j: (len(tokens[j]), cids[j]))
    bs = cfg.caption_block_size
    need = scorer_memory(
        n, max(f.shape[0] for f in audio.frames), model.cfg, sum(p.numel() for p in model.parameters()),
        cfg.scorer.precision, min(bs, m), embed_width=audio.frames[0].shape[1], vocab_size=tok.vocab_size,
        max_tokens=max(map(len, tokens)), pairs_per_batch=cfg.scorer.pairs_per_batch, gpu=cfg.actors.num_gpus > 0,
    )
    file_names, dcase_skip = dcase_file_names(cfg, audio.audio_ids, audio.sources)
    return ScorePlan(
        cfg=cfg, checkpoint_info=info, audio_ids=audio.audio_ids, frame_shapes=[f.shape for f in audio.frames],
        caption_ids=cids, tokens=tokens, gt_of=dict(zip(cids, gts, strict=True)), texts=list(texts),
        file_names=file_names, dcase_skip=dcase_skip, caps_of=caps_of,
        blocks=[order[i : i + bs] for i in range(0, m, bs)], probe_audios=probe_audios,
        corner_audios=corner_audios, corner_captions=corner_captions, oov=oov, need=need,
        skip_ids={tok.bos_id, tok.eos_id, tok.pad_id},
    )


def attach_candidates(plan: ScorePlan) -> None:
    """Phase 2 with `candidates` not exact (aacray/candidates.py): the pairs to score, and
    blocks re-cut so that each holds about caption_block_size x N pairs, as an exact block."""
    cfg = plan.cfg
    a_of = {a: i for i, a in enumerate(plan.audio_ids)}
    c_of = {c: j for j, c in enumerate(plan.caption_ids)}
    gt = np.array([a_of.get(plan.gt_of[c], -1) if plan.gt_of[c] is not None else -1 for c in plan.caption_ids])
    corner = np.array([(a_of[a], c_of[c]) for a in plan.corner_audios for c in plan.corner_captions], np.int64).reshape(-1, 2)
    plan.cands, plan.cand_info, plan.described = build_candidates(
        cfg, plan.audio_ids, {a: s[0] for a, s in zip(plan.audio_ids, plan.frame_shapes, strict=True)},
        plan.caption_ids, plan.texts, plan.tokens, gt, plan.skip_ids, [a_of[a] for a in plan.probe_audios],
        (corner[:, 0], corner[:, 1]), plan.checkpoint_info,
    )
    per_caption = plan.cands.per_caption
    fewest = int(per_caption.min())
    if plan.file_names is not None and fewest < DCASE_TOP_N:
        plan.file_names = None
        plan.dcase_skip = f"a caption has {fewest} candidate audios, and the format lists {DCASE_TOP_N} per caption"
    budget, blocks, current, size = cfg.caption_block_size * plan.n_audios, [], [], 0
    for j in (j for b in plan.blocks for j in b):  # the length order of the exact blocks
        current.append(j)
        size += int(per_caption[j])
        if size >= budget:
            blocks, current, size = blocks + [current], [], 0
    plan.blocks = blocks + ([current] if current else [])


def dcase_file_names(cfg: ScoreConfig, audio_ids: list[str], sources: list[str | None] | None):
    """(audio id -> file name for the DCASE task 6b export, or None; why it is skipped, or
    None). A file name is the last path part of the embedding's `source` (Clotho: the clip's
    file name, which is also its audio_id). Skipped when off, when k or the index is below
    the 10 the format lists, or when file names are missing or repeat."""
    why = None
    names = [str(x).rstrip("/").rsplit("/", 1)[-1] if x else "" for x in sources or [None] * len(audio_ids)]
    repeated = sorted(x for x, count in Counter(names).items() if count > 1)
    if not cfg.dcase_export:
        why = "dcase_export is off"
    elif cfg.k < DCASE_TOP_N or len(audio_ids) < DCASE_TOP_N:
        why = f"the format lists {DCASE_TOP_N} audios per caption: needs k >= {DCASE_TOP_N} and >= {DCASE_TOP_N} audios (k={cfg.k}, {len(audio_ids)} audios)"
    elif not all(names):
        why = "some audios have no `source` file in the embeddings table"
    elif repeated:
        why = f"audio file names repeat across the index (e.g. {repeated[:3]}): a DCASE row could not name one audio"
    if why:
        return None, why
    return dict(zip(audio_ids, names, strict=True)), None


def _plot_queries(audio_ids: list[str], cids: list[str], caps_of: dict[str, list[str]]):
    """(probe audios of the loss curves, the heatmap's audios, one caption of each): audios
    with ground-truth captions first choice, else the first ids."""
    sorted_audio = sorted(audio_ids)
    probe = [a for a in sorted_audio if a in caps_of][:N_CURVES] or sorted_audio[:N_CURVES]
    corner_audios = audio_ids[:CORNER]
    corner_captions = [sorted(caps_of[a])[0] for a in corner_audios if a in caps_of] or sorted(cids)[:CORNER]
    return probe, corner_audios, corner_captions


# --------------------------------------------------------------------------------------
# 2. Set up
# --------------------------------------------------------------------------------------


@dataclass
class Run:
    """The state of this run of a plan: its output, and which blocks are left to score."""

    output: Output
    blocks_uri: str
    done: set[int]  # blocks a previous run of the same plan left in _blocks/
    pending: list[int]  # the rest, longest captions first


def _set_up(plan: ScorePlan) -> Run:
    """Phase 2: check the memory, start Ray, resume or begin the output."""
    cfg = plan.cfg
    # a pool no node can host is refused (start_ray) before the output is touched. A cluster
    # is joined first, so the memory guard sees its nodes; an embedded Ray would run on this
    # machine, whose memory the guard reads without starting it: a job refused for memory
    # then starts no Ray at all
    cluster = joins_cluster(cfg.ray.address)
    if cluster:
        start_ray(JOB, cfg.ray, cfg.actors)
    check_actor_memory(JOB, plan.need, cfg.actors, WAYS_OUT)
    if not cluster:
        start_ray(JOB, cfg.ray, cfg.actors)
    if cfg.candidates != "exact":  # describing the index needs the actor pool
        attach_candidates(plan)
    blocks_uri = storage.join(cfg.output, BLOCKS)
    run_file = storage.join(blocks_uri, "_run.json")
    fingerprint = plan.fingerprint()
    resuming = storage.exists(run_file) and storage.read_json(run_file).get("fingerprint") == fingerprint
    if not resuming:
        storage.remove(blocks_uri)
    # `scores` is written by the actors block by block: a resumed run keeps what they wrote
    tables = list(TABLES) + ([DESCRIPTIONS] if plan.described is not None else [])
    output = Output(cfg.output, JOB, tables).begin(cfg, clear=[] if resuming else ["scores"])
    storage.write_json(run_file, {"fingerprint": fingerprint, "blocks": len(plan.blocks)})
    done = {i for i in range(len(plan.blocks)) if storage.exists(block_path(blocks_uri, i))} if resuming else set()
    if done:
        log.info("score_matrix: resuming: %d of %d blocks already scored, skipped", len(done), len(plan.blocks))
    # longest captions first (blocks are cut from captions sorted by length): the costliest
    # blocks start early and the short ones fill in at the end, so actors finish together
    pending = [i for i in reversed(range(len(plan.blocks))) if i not in done]
    return Run(output, blocks_uri, done, pending)


def block_path(blocks_uri: str, block: int) -> str:
    return storage.join(blocks_uri, f"block-{block:07d}.parquet")


# --------------------------------------------------------------------------------------
# 3. Run: the Ray Data actor and the pipeline
# --------------------------------------------------------------------------------------


def scores_table(audio_ids, caption_ids, L: np.ndarray) -> pa.Table:
    """The `scores` data contract for losses L (N, m) of N audios x m captions: one row per
    pair, audio-major: audio_id string, caption_id string, loss float32."""
    n, m = L.shape
    assert (n, m) == (len(audio_ids), len(caption_ids)), f"{L.shape=} {len(audio_ids)=} {len(caption_ids)=}"
    a, c = np.asarray(audio_ids, dtype=object), np.asarray(caption_ids, dtype=object)
    return pairs_table(np.repeat(a, m), np.tile(c, n), L.reshape(-1))


def pairs_table(audio_ids, caption_ids, loss: np.ndarray) -> pa.Table:
    """The `scores` contract for listed pairs, all (P,): one row each."""
    return pa.table(
        {
            "audio_id": pa.array(audio_ids, pa.string()),
            "caption_id": pa.array(caption_ids, pa.string()),
            "loss": pa.array(np.asarray(loss, np.float32), pa.float32()),
        }
    )


def write_scores_block(scores_uri: str, name: str, audio_ids, caption_ids, L: np.ndarray) -> str:
    """One actor's block of the `scores` table (losses L (N, m)): `write_scores_file`."""
    return write_scores_file(scores_uri, name, scores_table(audio_ids, caption_ids, L))


def write_scores_file(scores_uri: str, name: str, table: pa.Table) -> str:
    """A part of the `scores` table as one Parquet file `name` under scores_uri (a stable
    name per block: a retried block overwrites its own file). Returns its URI."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    uri = storage.join(scores_uri, name)
    storage.write_bytes(uri, buf.getvalue())
    return uri


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
        t0 = time.time()
        cfg = from_dict(ScoreConfig, cfg_dict)
        device, model, tok, _ = actor_setup(cfg.actors, cfg.checkpoint, cfg.task)
        audio = read_embeddings(cfg.audio, cfg.audio_subsets)
        self.audio_ids = audio.audio_ids
        self.scorer = BlockScorer(
            model, tok.pad_id, audio.frames, device, cfg.scorer.precision, cfg.scorer.pairs_per_batch, cfg.scorer.refine_margin
        )
        self.k, self.minmax_ties = cfg.k, cfg.minmax_ties
        self.scores_uri = storage.join(cfg.output, "scores") if cfg.write_scores else None
        pos = {a: i for i, a in enumerate(self.audio_ids)}
        self.probe_idx = [pos[a] for a in probe_audios]
        self.corner_captions = set(corner_captions)
        self.blocks_uri = storage.join(cfg.output, BLOCKS)
        self.fail_on_block = fail_on_block  # a test's fault injection, never a config key
        # metrics.json's `timing`: who scored a block, and what this actor's set-up took
        self.actor = actor_name()
        self.setup_seconds = time.time() - t0

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
                audios = [np.asarray(x, np.int64) for x in batch["audios"][i]] if "audios" in batch else None
                storage.write_bytes(path, self.score(cids, tokens, audios))
            done.append(block)
        return {"block": np.array(done, dtype=np.int64)}

    def score(self, cids: list[str], tokens: list[list[int]], audios: list[np.ndarray] | None = None) -> bytes:
        """One block -> stats, top-k lists, plot rows (a one-row Parquet). audios: each
        caption's audio positions (listed candidates); None, or every audio for each: the
        dense (N, m) losses."""
        t0 = time.time()
        n = len(self.audio_ids)
        key = hashlib.sha1("\x00".join(cids).encode()).hexdigest()[:20]
        if audios is None or all(x.size == n for x in audios):
            L, refined = self.scorer.losses(tokens, self.k)  # (N, m)
            res = score_block(L, self.audio_ids, cids, self.k, self.minmax_ties)
            if self.scores_uri:
                write_scores_block(self.scores_uri, f"block-{key}.parquet", self.audio_ids, cids, L)
            rows, n_pairs = L, L.size
        else:
            a_pos = np.concatenate(audios)
            c_pos = np.repeat(np.arange(len(cids)), [x.size for x in audios])
            losses, refined = self.scorer.loss_pairs(a_pos, tokens, c_pos), None
            res = score_pairs_block(a_pos, c_pos, losses, self.audio_ids, cids, self.k, self.minmax_ties)
            if self.scores_uri:
                ids = np.asarray(self.audio_ids, dtype=object)
                table = pairs_table(ids[a_pos], np.asarray(cids, dtype=object)[c_pos], losses)
                write_scores_file(self.scores_uri, f"block-{key}.parquet", table)
            rows, n_pairs = _PairRows(a_pos, c_pos, losses, len(cids)), losses.size
        row = pa.table(
            {
                "stats": [_ipc(pa.table(res.stats.columns()))],
                "t2a": [_ipc(pa.table(res.t2a.columns()))],
                "a2t_raw": [_ipc(pa.table(res.a2t_raw.columns()))],
                "a2t_minmax": [_ipc(pa.table(res.a2t_minmax.columns()))],
                **self._plot_rows(cids, rows),
                "n_pairs": [n_pairs],
                "rescored": [refined["rescored"] if refined else 0],
                "max_rel_err": [refined["max_rel_err"] if refined else 0.0],
                "started": [t0],
                "seconds": [time.time() - t0],
                "actor": [self.actor],
                "actor_setup_seconds": [self.setup_seconds],
            }
        )
        buf = io.BytesIO()
        pq.write_table(row, buf)
        return buf.getvalue()

    def _plot_rows(self, cids: list[str], L) -> dict[str, list[bytes]]:
        """The block's share of the figures: the probe audios' losses of its captions, and
        the heatmap corner's columns it holds. L: the (N, m) losses, or `_PairRows`."""
        probe = pa.table(
            {
                "caption_id": pa.array(cids, pa.string()),
                **{f"probe{i}": pa.array(L[ai], pa.float32()) for i, ai in enumerate(self.probe_idx)},
            }
        )
        # typed columns: a block may hold none of the corner captions (an empty table must
        # still concatenate with the others)
        cols = [j for j, c in enumerate(cids) if c in self.corner_captions]
        corner = pa.table(
            {
                "caption_id": pa.array([cids[j] for j in cols], pa.string()),
                **{a: pa.array(L[i][cols], pa.float32()) for i, a in enumerate(self.audio_ids[:CORNER])},
            }
        )
        return {"probe": [_ipc(probe)], "corner": [_ipc(corner)]}


class _PairRows:
    """Listed pairs' losses read like the rows of an (N, m) matrix: row a is (m,), NaN where
    (a, c) was not scored (the figures' audios and pairs always are: `build_candidates`)."""

    def __init__(self, a_pos: np.ndarray, c_pos: np.ndarray, losses: np.ndarray, m: int):
        self.a_pos, self.c_pos, self.losses, self.m = a_pos, c_pos, losses, m

    def __getitem__(self, a: int) -> np.ndarray:
        row = np.full(self.m, np.nan, dtype=np.float32)
        sel = self.a_pos == a
        row[self.c_pos[sel]] = self.losses[sel]
        return row


def _run_blocks(plan: ScorePlan, run: Run, fail_on_block: int | None) -> None:
    """Phase 3: the pending blocks on the actor pool; each lands in `_blocks/`."""
    if not run.pending:
        return
    import ray.data

    cids, tokens, blocks = plan.caption_ids, plan.tokens, plan.blocks
    # 1. one row per block of captions
    ds = ray.data.from_items(
        [
            {"block": i, "caption_id": [cids[j] for j in blocks[i]], "tokens": [np.array(tokens[j], np.int32) for j in blocks[i]],
             **({"audios": [plan.cands.of(j) for j in blocks[i]]} if plan.cands is not None else {})}
            for i in run.pending
        ],
        override_num_blocks=len(run.pending),
    )
    # 2. each block x every audio on the actor pool, one block at a time per actor: a block
    # is seconds to minutes of work, and one queued behind another would idle a free actor
    kwargs = {"cfg_dict": to_dict(plan.cfg), "probe_audios": plan.probe_audios,
              "corner_captions": plan.corner_captions, "fail_on_block": fail_on_block}
    ds = map_actors(ds, ScoreActor, kwargs, plan.cfg.actors, batch_size=1, one_task_per_actor=True)
    finished = {int(r["block"]) for r in ds.iter_rows()}
    if finished != set(run.pending):
        raise RuntimeError(f"blocks missing after scoring: {sorted(set(run.pending) - finished)[:10]}")


# --------------------------------------------------------------------------------------
# 4. Reduce
# --------------------------------------------------------------------------------------


class _A2TMerger:
    """Running per-audio top-k: parts are merged when they pile up (amortised). keep_min_ties:
    the authors' rule's candidates (`topk_merge`), which may hold more than k rows an audio."""

    def __init__(self, kind: str, k: int, n_audios: int, keep_min_ties: bool = False):
        self.kind, self.k, self.keep_min_ties = kind, k, keep_min_ties
        self.parts, self.rows, self.limit = [], 0, max(4 * n_audios * k, 1 << 16)

    def add(self, t: TopK) -> None:
        self.parts.append(t)
        self.rows += len(t)
        if self.rows > self.limit:
            self.parts = [self.result()]
            self.rows = len(self.parts[0])
            self.limit = max(self.limit, 2 * self.rows)  # many ties kept: merge less often

    def result(self) -> TopK:
        return topk_merge(self.parts, self.k, self.kind, self.keep_min_ties)


@dataclass
class Reduced:
    """Every block's result merged: the final tables, the figures' rows, the counts."""

    result: BlockResult
    probe: pa.Table
    corner: pa.Table
    n_pairs: int
    rescored: int
    max_rel_err: float
    work: PoolWork  # this run's blocks, timed inside the actors: metrics.json's `timing`


def _reduce(plan: ScorePlan, run: Run) -> Reduced:
    """Phase 4: read every block's result file (this run's and a resumed run's) and merge."""
    k, n = plan.cfg.k, plan.n_audios
    stats_parts, t2a_parts, probe_parts, corner_parts = [], [], [], []
    authors = plan.cfg.minmax_ties == "authors"
    raw, mm = _A2TMerger("a2t_raw", k, n), _A2TMerger("a2t_minmax", k, n, keep_min_ties=authors)
    n_pairs, rescored, max_rel_err = 0, 0, 0.0
    work = PoolWork()
    pending = set(run.pending)
    for i in range(len(plan.blocks)):
        fs, path = storage.get_fs(block_path(run.blocks_uri, i))
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
        if i in pending:
            work.add(row["actor"], row["actor_setup_seconds"], row["started"], row["seconds"])
    expected = sum(plan.n_pairs_of(i) for i in range(len(plan.blocks)))
    if n_pairs != expected:
        raise RuntimeError(f"scored {n_pairs} pairs, expected {expected} ({n} audios x {plan.n_captions} captions, candidates {plan.cfg.candidates})")
    stats = CaptionStats.from_columns(pa.concat_tables(stats_parts))
    minmax = authors_tie_order(mm.result(), k) if authors else mm.result()
    result = BlockResult(stats, topk_merge(t2a_parts, k, "t2a"), raw.result(), minmax)
    return Reduced(result, pa.concat_tables(probe_parts), pa.concat_tables(corner_parts), n_pairs, rescored, max_rel_err, work)


# --------------------------------------------------------------------------------------
# 5. Commit
# --------------------------------------------------------------------------------------


def _metrics(plan: ScorePlan, run: Run, red: Reduced, score_seconds: float, timing: dict) -> dict[str, Any]:
    """metrics.json: Recall@k and mAP@10 when there is ground truth and k >= 10, then counts,
    speed and the scorer's identity."""
    cfg = plan.cfg
    metrics: dict[str, Any] = {}
    if any(g is not None for g in plan.gt_of.values()) and cfg.k >= 10:
        r = red.result
        metrics = retrieval_metrics(
            r.t2a, r.a2t_raw, r.a2t_minmax, plan.gt_of,
            index_ids=None if plan.cands is None else (plan.audio_ids, plan.caption_ids),
        )
    scored = sum(plan.n_pairs_of(i) for i in run.pending)
    metrics.update(
        {
            "n_audios": plan.n_audios,
            "n_captions": plan.n_captions,
            "n_pairs": red.n_pairs,
            "captions_with_unknown_words": plan.oov,
            "pairs_scored_this_run": scored,
            "pairs_per_s": round(scored / max(score_seconds, 1e-9), 1),
            "score_seconds": round(score_seconds, 2),
            "timing": timing,
            "blocks": len(plan.blocks),
            "blocks_skipped_on_resume": len(run.done),
            "scorer": {"version": SCORER_VERSION, "precision": cfg.scorer.precision},
            "minmax_ties": cfg.minmax_ties,
            "candidates": plan.cand_info or {"mode": "exact"},
            "dcase_t2a": DCASE_FILE if plan.dcase_skip is None else f"not written: {plan.dcase_skip}",
            "checkpoint": plan.checkpoint_info,
        }
    )
    if cfg.scorer.precision == "bf16-refined":
        metrics["scorer"]["refine"] = refine_summary(cfg.scorer.refine_margin, red.n_pairs, red.rescored, red.max_rel_err)
    return metrics


def _commit(plan: ScorePlan, run: Run, red: Reduced, metrics: dict) -> None:
    """Phase 5: the tables, metrics.json and the figures, then the manifest; `_blocks/` goes."""
    out, r = run.output, red.result
    out.table("caption_stats", pa.table(r.stats.columns()))
    out.table("topk_t2a", pa.table(r.t2a.columns()))
    out.table("topk_a2t", pa.table(r.a2t_minmax.columns()))
    out.table("topk_a2t_raw", pa.table(r.a2t_raw.columns()))
    if plan.described is not None:
        out.table(DESCRIPTIONS, plan.described)
    out.json("metrics.json", metrics)
    if plan.file_names is not None:  # before the manifest, which names it
        storage.write_text(out.path(DCASE_FILE), dcase_task6b_csv(r.t2a, plan.caption_ids, plan.texts, plan.file_names))
    else:  # a previous run's file would describe other lists
        log.info("score_matrix: %s not written: %s", DCASE_FILE, plan.dcase_skip)
        storage.remove(out.path(DCASE_FILE))
    plots = []
    if plan.cfg.plots:
        plots.append(plot_loss_curves(out.uri, red.probe, plan.probe_audios, plan.caps_of, r.stats))
        plots.append(plot_heatmap(out.uri, red.corner, plan.corner_audios, plan.corner_captions, plan.gt_of))
    # the manifest lists `scores` too when the actors wrote it (not cleared on a resume)
    tables = out.tables + (["scores"] if plan.cfg.write_scores else [])
    dataclasses.replace(out, tables=tables).commit(
        {"metrics": "metrics.json", "plots": plots, "dcase_t2a": DCASE_FILE if plan.file_names is not None else None,
         "blocks_skipped_on_resume": len(run.done)}
    )
    storage.remove(run.blocks_uri)


# --------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------


def run_score_matrix(cfg: ScoreConfig, _fail_on_block: int | None = None) -> dict:
    """Score every audio x caption pair, in the five phases of the module docstring.
    _fail_on_block: a test's fault injection (that block's actor raises), not a config key."""
    t_start = time.time()
    plan = plan_score_matrix(cfg)
    run = _set_up(plan)
    t_score = time.time()
    _run_blocks(plan, run, _fail_on_block)
    t_reduce = time.time()
    red = _reduce(plan, run)
    t_done = time.time()
    timing = red.work.timing(JOB, plan.cfg.actors.num_actors, t_score, t_reduce, t_done - t_reduce)
    metrics = _metrics(plan, run, red, t_done - t_score, timing)
    _commit(plan, run, red, metrics)
    # Recall@10 needs ground truth and k >= 10; otherwise the output holds rankings only
    print(format_table(metrics) if "t2a" in metrics else "(no ground truth or k < 10: rankings only)", flush=True)
    return {
        "output": cfg.output,
        "n_audios": plan.n_audios,
        "n_captions": plan.n_captions,
        "n_pairs": red.n_pairs,
        "pairs_per_s": metrics["pairs_per_s"],
        "wall_seconds": round(time.time() - t_start, 1),
        **{k: metrics[k] for k in ("t2a", "a2t_raw", "a2t_minmax") if k in metrics},
    }


def format_table(metrics: dict) -> str:
    """A table like the paper's Table 2 (R@1/5/10 for T2A and A2T, raw and min-max), with
    mAP@10 both ways and the min-max tie rule."""

    def f(v):
        return "  -  " if v is None else f"{v:.3f}"

    def cells(m: dict | None) -> str:
        return "  ".join(f(m[key]) if m else " " * 5 for key in ("R@1", "R@5", "R@10", "mAP@10"))

    lines = [
        f"Retrieval on {metrics['n_audios']} audios x {metrics['n_captions']} captions ({metrics['n_pairs']} pairs)",
        "                 Text-to-audio               Audio-to-text",
        "                 R@1    R@5    R@10   mAP@10 R@1    R@5    R@10   mAP@10",
        f"raw loss         {cells(metrics['t2a'])}  {cells(metrics['a2t_raw'])}",
        f"min-max (A2T)*   {cells(None)}  {cells(metrics['a2t_minmax'])}",
        f"* captions' losses min-max scaled over the audio index (paper 4.2); ties: {metrics.get('minmax_ties', 'paper')}",
    ]
    return "\n".join(lines)
