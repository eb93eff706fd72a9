"""Stage: fit the projection + decoder on Ray Train from the embedding Parquet.

- The driver reads and checks the inputs before any worker starts (bad captions, bad
  embeddings, captions without audio: an error naming them, or quarantine by config), builds
  the word vocabulary on the training captions, and tokenises every caption once.
- Workers stream their shard of the embedding Parquet (`ray.train.get_dataset_shard`),
  draw one of each clip's captions per epoch, and run the paper's recipe under DDP:
  AdamW (no decay on biases), cosine decay per epoch, clip 1, label smoothing, mixup,
  SpecAugment on frame embeddings.
- Every `checkpoint_every` epochs (and after the last) rank 0 writes a checkpoint (weights,
  optimizer, scheduler, epoch, metric history, tokenizer, resolved config) to
  `OUTPUT/ray_train/checkpoint_epoch_NNNN/`, its `_COMPLETE.json` marker last
  (aacray/checkpoint.py), and keeps the two newest.
- Resume. aacray picks the checkpoint itself and never registers one with Ray Train: Ray's
  list (`checkpoint_manager_snapshot.json`) is written by its controller a poll (2 s) after
  the worker has written the folder, so an interrupt can leave complete folders that the
  list does not name, or none at all, and a rerun that trusted it retrained from epoch 1
  in silence. Instead every worker start (a rerun of the job, or a restart after a worker
  died with `max_failures` > 0) continues from the newest complete folder on disk;
  half-written ones are skipped with a log line. Before starting, the driver refuses a
  checkpoint trained with another model, vocabulary or recipe (RESUME_MUST_MATCH), and
  refuses checkpoints none of which is complete; `restart=true` removes them and trains
  from epoch 1. What a run resumed from is logged and kept in metrics.json.
- The output commits with its manifest last; `checkpoint/` holds the final model.
- Tests inject faults at named points of the worker loop with AACRAY_TEST_HOOK (FaultHook);
  no config can set it.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
import yaml

from aacray import checkpoint as ckpt_lib
from aacray import selection, storage
from aacray.config import TrainConfig, dump_yaml, from_dict, to_dict
from aacray.decoder import (
    CaptionDecoder,
    DecoderConfig,
    pad_frames,
    pad_tokens,
    pair_loss,
    train_loss,
)
from aacray.embeddings import EmbeddingSet, check_embeddings, read_captions, read_embeddings
from aacray.errors import BadInputError
from aacray.text import WordTokenizer, normalize

log = logging.getLogger("aacray.train")



@dataclass
class Prepared:
    tokenizer: WordTokenizer
    train_tokens: dict[str, list[list[int]]]  # audio_id -> token id lists of its captions
    val_tokens: dict[str, list[list[int]]]
    quarantine: list[dict]
    val_texts: dict[str, list[str]] = field(default_factory=dict)
    """audio_id -> the texts of its usable validation captions (references for selection)."""


# --------------------------------------------------------------------------------------
# Driver-side checks and tokenisation (pure, testable without Ray)
# --------------------------------------------------------------------------------------


def prepare(cfg: TrainConfig, train: EmbeddingSet, val: EmbeddingSet, captions: pa.Table) -> Prepared:
    """Checks every training input and tokenises the captions, with the vocabulary built from
    the train split. A bad audio, a caption without a usable audio or in-vocabulary word, and a
    caption over the decoder's length (refused, never cut) is an error naming each item, or
    with on_bad_input=quarantine is left out and listed in `Prepared.quarantine`."""
    bad: list[dict] = []
    bad_audio = {}
    for split, es in (("train", train), ("val", val)):
        for aid, why in check_embeddings(es, split):
            bad.append({"item": f"audio {aid}", "reason": why})
            bad_audio[aid] = why
    per_split = _usable_captions(cfg, train, val, captions, bad_audio, bad)
    tok = WordTokenizer.build([t for _, _, t in per_split["train"]], min_freq=cfg.min_freq)
    out, val_texts = _encode_captions(per_split, tok, cfg.model, bad)
    for split, es in (("train", train), ("val", val)):
        for aid in es.audio_ids:
            if aid not in out[split] and aid not in bad_audio:
                bad.append({"item": f"audio {aid}", "reason": "no usable caption"})
    if bad and cfg.on_bad_input == "error":
        shown = "\n".join(f"  {b['item']}: {b['reason']}" for b in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise BadInputError(
            f"{len(bad)} bad training input(s), nothing was trained:\n{shown}{more}\n"
            "Fix them, or set on_bad_input=quarantine to leave them out (they are then listed "
            "in quarantine.json)."
        )
    if not out["train"]:
        raise BadInputError(f"no usable training clips in subsets {cfg.train_subsets}")
    if not out["val"]:
        raise BadInputError(f"no usable validation clips in subsets {cfg.val_subsets}")
    return Prepared(tok, out["train"], out["val"], bad, val_texts)


def _usable_captions(cfg: TrainConfig, train: EmbeddingSet, val: EmbeddingSet, captions: pa.Table,
                     bad_audio: dict[str, str], bad: list[dict]) -> dict[str, list[tuple[str, str, str]]]:
    """split -> (caption id, audio id, text) of the selected subsets' captions whose audio is
    usable and whose text is not empty after normalisation; the others go to `bad`."""
    subset_of = {a: "train" for a in train.audio_ids} | {a: "val" for a in val.audio_ids}
    wanted = set(cfg.train_subsets) | set(cfg.val_subsets)
    per_split: dict[str, list[tuple[str, str, str]]] = {"train": [], "val": []}
    for r in captions.to_pylist():
        if r["subset"] not in wanted:
            continue
        cid, aid, text = r["caption_id"], r["audio_id"], r["text"] or ""
        if aid is None or aid not in subset_of:
            bad.append({"item": f"caption {cid}", "reason": f"its audio {aid!r} has no embedding"})
        elif aid in bad_audio:
            bad.append({"item": f"caption {cid}", "reason": f"its audio {aid} is bad ({bad_audio[aid]})"})
        elif not normalize(text):
            bad.append({"item": f"caption {cid}", "reason": f"empty after normalisation: {text!r}"})
        else:
            per_split[subset_of[aid]].append((cid, aid, text))
    return per_split


def _encode_captions(per_split, tok: WordTokenizer, model: DecoderConfig, bad: list[dict]):
    """(split -> audio id -> token lists, audio id -> its validation texts). A caption with no
    in-vocabulary word, or longer than the decoder's max_len positions take (bos and the words;
    a cut one would teach an ending the caption does not have), goes to `bad` instead."""
    out: dict[str, dict[str, list[list[int]]]] = {"train": {}, "val": {}}
    val_texts: dict[str, list[str]] = {}
    for split, items in per_split.items():
        for cid, aid, text in items:
            ids = tok.encode(text)
            if all(i == tok.unk_id for i in ids[1:-1]):
                bad.append({"item": f"caption {cid}", "reason": f"no in-vocabulary word: {text!r}"})
            elif len(ids) > model.max_tokens:
                bad.append({"item": f"caption {cid}", "reason": (
                    f"{len(ids) - 2} words, over the decoder's limit of {model.max_tokens - 2} (model.max_len = "
                    f"{model.max_len}): shorten it or train with a larger model.max_len")})
            else:
                out[split].setdefault(aid, []).append(ids)
                if split == "val":
                    val_texts.setdefault(aid, []).append(text)
    return out, val_texts


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on any 1-D parameter (biases, LayerNorm weights), as the
    authors' code does (conette's `_custom_weight_decay`; the paper says "not on biases")."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
    )


def cosine_factor(epoch: int, epochs: int) -> float:
    """lr_k = 0.5 (1 + cos(k pi / K)) lr_0, k the number of finished epochs."""
    return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: cosine_factor(k, cfg.epochs))


def draw_captions(audio_ids: list[str], tokens: dict[str, list[list[int]]], rng: np.random.Generator) -> list[list[int]]:
    """One of each clip's captions, drawn uniformly (paper 3.1: one of five per clip per epoch)."""
    return [tokens[a][rng.integers(len(tokens[a]))] for a in audio_ids]


def check_finite(loss: torch.Tensor, epoch: int, rank: int) -> None:
    """Stop on a non-finite loss: nothing trains on NaN."""
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"non-finite training loss ({loss.item()}) at epoch {epoch} on rank {rank}; "
            "stopping: check the embeddings for NaN/inf and lower lr"
        )


def optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float) -> float:
    """Backward, clip the gradients' global L2 norm to `grad_clip`, step. Returns the norm
    before clipping."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return float(norm)


class _TrainStep(torch.nn.Module):
    """Runs the whole augmented training loss inside forward, so DDP syncs gradients."""

    def __init__(self, model: CaptionDecoder, cfg: TrainConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, frames, frame_mask, tokens, generator):
        c = self.cfg
        return train_loss(
            self.model,
            frames,
            frame_mask,
            tokens,
            label_smoothing=c.label_smoothing,
            mixup_alpha=c.mixup_alpha or None,
            spec_augment=(c.spec_aug_stripes, c.spec_aug_width) if c.spec_aug_stripes > 0 else None,
            generator=generator,
        )


def _batch_frames(batch: pa.Table) -> tuple[list[str], list[np.ndarray]]:
    from aacray.embeddings import _chunk_frames

    col = batch.column("embedding")
    frames = []
    for chunk in col.chunks:
        frames.extend(_chunk_frames(chunk, col.type.value_type.list_size))
    return batch.column("audio_id").to_pylist(), frames


# --------------------------------------------------------------------------------------
# One training epoch, in-process (the worker runs exactly these; the tests call them too)
# --------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """What the phases of one worker's loop share."""

    cfg: TrainConfig
    tok: WordTokenizer
    train_tokens: dict[str, list[list[int]]]
    val_tokens: dict[str, list[list[int]]]
    model: CaptionDecoder
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    step: torch.nn.Module  # _TrainStep; wrapped in DDP on Ray workers
    rank: int = 0
    world: int = 1
    start_epoch: int = 0
    """Epochs the resumed checkpoint holds (0: trained from scratch)."""
    history: list[dict] = field(default_factory=list)
    resumes: list[dict] = field(default_factory=list)
    """Every resume behind these weights: {"epoch", "checkpoint"}, oldest first."""
    hook: FaultHook | None = None
    val_texts: dict[str, list[str]] = field(default_factory=dict)
    val_clips: Callable[[], EmbeddingSet] | None = None
    """Rank 0's whole validation set for selection criteria other than val_loss (a Ray
    worker's `rows("val")` is only its shard); read on first use."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def per_worker(self) -> int:
        return max(1, self.cfg.batch_size // self.world)


@dataclass
class EpochStats:
    """One worker's sums for one epoch, before they are added across workers."""

    samples: int = 0
    loss_sum: float = 0.0
    steps: int = 0
    seconds: float = 0.0
    val_loss_sum: float = 0.0
    val_pairs: int = 0


def new_train_state(cfg: TrainConfig, tok: WordTokenizer, train_tokens: dict, val_tokens: dict, rank: int = 0, world: int = 1) -> TrainState:
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = CaptionDecoder(cfg.model, tok.vocab_size, tok.pad_id)
    opt = build_optimizer(model, cfg)
    return TrainState(cfg, tok, train_tokens, val_tokens, model, opt, build_scheduler(opt, cfg), _TrainStep(model, cfg), rank, world)


def epoch_generators(cfg: TrainConfig, epoch: int, rank: int) -> tuple[np.random.Generator, torch.Generator]:
    """The epoch's shuffling/caption rng and augmentation generator: fixed by (seed, epoch,
    rank), so an epoch replayed after a resume draws what it drew the first time."""
    rng = np.random.default_rng([cfg.seed, epoch, rank])
    return rng, torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + rank)


def train_step(st: TrainState, frames: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor, gen: torch.Generator, epoch: int) -> float:
    """One optimisation step: the recipe's augmented loss (SpecAugment, mixup, label
    smoothing from st.cfg), a finite check, gradient clipping, AdamW. Returns the loss."""
    d = st.device
    loss = st.step(frames.to(d), mask.to(d), tokens.to(d), gen)
    check_finite(loss, epoch + 1, st.rank)
    optimizer_step(st.model, st.opt, loss, st.cfg.grad_clip)
    return loss.item()


def train_epoch(st: TrainState, rows: list[tuple[str, np.ndarray]], epoch: int) -> EpochStats:
    """One pass over this worker's (audio_id, frames) rows in batches of st.per_worker,
    then one scheduler step: the cosine decay is per epoch, not per batch."""
    st.model.train()
    rng, gen = epoch_generators(st.cfg, epoch, st.rank)
    # dropout draws from torch's global generator: seeded per epoch too, so that a resumed
    # run trains exactly the epochs an uninterrupted one would
    torch.manual_seed(gen.initial_seed() + 1)
    stats, t0 = EpochStats(), time.time()
    order = rng.permutation(len(rows))
    for b in range(0, len(order), st.per_worker):
        chosen = [rows[i] for i in order[b : b + st.per_worker]]
        caps = draw_captions([a for a, _ in chosen], st.train_tokens, rng)
        x, mask = pad_frames([f for _, f in chosen])
        stats.loss_sum += train_step(st, x, mask, pad_tokens(caps, st.tok.pad_id), gen, epoch)
        stats.samples += len(chosen)
        stats.steps += 1
        if stats.steps == 1:
            fire_hook(st.hook, "mid_epoch", epoch + 1)
    stats.seconds = time.time() - t0
    st.sched.step()
    return stats


def validate(st: TrainState, rows: list[tuple[str, np.ndarray]], stats: EpochStats, epoch: int) -> None:
    """Add the per-pair loss of every caption of every validation clip to `stats`."""
    st.model.eval()
    d, pad = st.device, st.tok.pad_id
    with torch.inference_mode():
        for b in range(0, len(rows), st.per_worker):
            rep = [(f, c) for a, f in rows[b : b + st.per_worker] for c in st.val_tokens[a]]
            x, mask = pad_frames([f for f, _ in rep])
            pl = pair_loss(st.model, x.to(d), mask.to(d), pad_tokens([c for _, c in rep], pad).to(d), pad)
            stats.val_loss_sum += float(pl.sum())
            stats.val_pairs += len(rep)
            fire_hook(st.hook, "validation", epoch + 1)


def epoch_metrics(st: TrainState, epoch: int, stats: EpochStats) -> dict:
    """The epoch's row of the history, summed over workers."""
    t = torch.tensor([stats.samples, stats.loss_sum, stats.steps, stats.val_loss_sum, stats.val_pairs], dtype=torch.float64)
    if st.world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    samples, loss_sum, steps, v_sum, v_n = t.tolist()
    return {
        "epoch": epoch + 1,
        "train_loss": loss_sum / max(steps, 1),
        "val_loss": v_sum / max(v_n, 1),
        "lr": st.opt.param_groups[0]["lr"],
        "samples_per_s": samples / max(stats.seconds, 1e-9),
    }


# --------------------------------------------------------------------------------------
# Checkpoints of a run, and where to resume
# --------------------------------------------------------------------------------------

KEEP_CHECKPOINTS = 2
"""Checkpoints kept under ray_train/: the newest, and one to fall back on."""

RESUME_MUST_MATCH = (
    "model", "train_subsets", "val_subsets", "min_freq", "epochs", "batch_size", "lr", "betas",
    "eps", "weight_decay", "grad_clip", "label_smoothing", "mixup_alpha", "spec_aug_stripes",
    "spec_aug_width", "seed", "select_by",
)
"""Config keys a resumed run must share with its checkpoint: the model, the data it was
fitted on and the recipe (epochs sets the cosine schedule). Paths, workers, resources and
failure handling may change between runs."""


@dataclass(frozen=True)
class ResumePoint:
    epoch: int = 0
    """Epochs the checkpoint holds; 0: train from epoch 1."""
    checkpoint: str | None = None


def newest_complete(run: str, skipped: list[tuple[str, str]] | None = None) -> tuple[int, str] | None:
    """(epoch, folder) of the newest complete checkpoint under `run`, or None. The
    incomplete ones newer than it are appended to `skipped` as (folder, reason)."""
    for epoch, folder in ckpt_lib.run_checkpoints(run):
        reason = ckpt_lib.incomplete_reason(folder)
        if reason is None:
            return epoch, folder
        log.warning("skipping checkpoint %s: %s", folder, reason)
        if skipped is not None:
            skipped.append((folder, reason))
    return None


def resume_mismatch(cfg: TrainConfig, tok: WordTokenizer, folder: str) -> list[str]:
    """What differs, in RESUME_MUST_MATCH or the vocabulary, between `cfg` and the
    config the checkpoint in `folder` was trained with."""
    old = yaml.safe_load(storage.read_bytes(storage.join(folder, "config.yaml")).decode("utf-8")) or {}
    new = to_dict(cfg)
    diffs = [f"{k}: {old.get(k)!r} in the checkpoint, {new[k]!r} now" for k in RESUME_MUST_MATCH if old.get(k) != new[k]]
    if storage.read_bytes(storage.join(folder, "tokenizer.json")).decode("utf-8") != tok.to_str():
        diffs.append("vocabulary: the training captions give another vocabulary than the checkpoint's")
    if not diffs:  # same model and recipe, but the optimizer may group parameters otherwise
        model = CaptionDecoder(cfg.model, tok.vocab_size, tok.pad_id)
        now = [len(g["params"]) for g in build_optimizer(model, cfg).param_groups]
        saved = [len(g["params"]) for g in ckpt_lib.load_state(folder)["optimizer"]["param_groups"]]
        if saved != now:
            diffs.append(f"optimizer parameter groups: {saved} tensors in the checkpoint, {now} now (another aacray version)")
    return diffs


def plan_resume(cfg: TrainConfig, tok: WordTokenizer, run: str) -> ResumePoint:
    """Where this run starts: the newest complete checkpoint under `run` (half-written
    ones are logged and removed), or epoch 1 when there is none. Raises BadInputError when
    checkpoints exist but none is complete, or when the newest was trained with another
    config; with restart=true the checkpoints are removed instead."""
    found = ckpt_lib.run_checkpoints(run)
    if found and cfg.restart:
        log.warning("restart=true: removing %d checkpoint(s) under %s; training from epoch 1", len(found), run)
        for _, folder in found:
            storage.remove(folder)
        return ResumePoint()
    skipped: list[tuple[str, str]] = []
    newest = newest_complete(run, skipped)
    if newest is None and skipped:
        listing = "\n".join(f"  {folder}: {why}" for folder, why in skipped)
        raise BadInputError(
            f"{run} holds {len(skipped)} checkpoint(s) and none is complete, so nothing was trained:\n"
            f"{listing}\nRetraining from epoch 1 would discard them: set restart=true to do that."
        )
    if newest is None:
        return ResumePoint()
    epoch, folder = newest
    diffs = resume_mismatch(cfg, tok, folder)
    if diffs:
        raise BadInputError(
            f"{folder} (epoch {epoch}) was trained with another config; resuming from it would mix "
            "two runs:\n  " + "\n  ".join(diffs) + "\nRun with the checkpoint's values, write to "
            f"another output, or set restart=true to remove the checkpoints under {run} and train from epoch 1."
        )
    for half, why in skipped:
        log.warning("removing half-written checkpoint %s (%s)", half, why)
        storage.remove(half)
    return ResumePoint(epoch, folder)


def prune_checkpoints(run: str, newest: int, keep: int = KEEP_CHECKPOINTS, also_keep: int | None = None) -> None:
    """Remove the folders older than the run's `keep` newest marked checkpoints up to
    epoch `newest`, except epoch `also_keep` (the selected one so far). It runs after every
    checkpoint, so it checks markers, not digests; folders past `newest` (left by a crashed
    attempt) are overwritten when reached."""
    kept = 0
    for epoch, folder in ckpt_lib.run_checkpoints(run):
        if epoch > newest:
            continue
        if kept < keep and storage.exists(storage.join(folder, ckpt_lib.MARKER)):
            kept += 1  # one of the newest (the selected one may be among them)
        elif epoch != also_keep:
            storage.remove(folder)


# --------------------------------------------------------------------------------------
# Fault injection for the tests
# --------------------------------------------------------------------------------------

HOOK_POINTS = ("mid_epoch", "validation", "checkpoint_write", "after_checkpoint")
HOOK_ACTIONS = ("kill", "block", "raise")


class InjectedFault(RuntimeError):
    """Raised by a FaultHook with action `raise` (a fault injected by a test)."""


@dataclass(frozen=True)
class FaultHook:
    """AACRAY_TEST_HOOK=POINT:EPOCH[:ACTION] with AACRAY_TEST_HOOK_FLAG=FILE: at POINT of
    epoch EPOCH (1-based) the worker creates FILE, then SIGKILLs itself (kill, the default),
    sleeps until the job is interrupted (block) or raises InjectedFault (raise). A hook whose FILE exists does not fire,
    so a restarted worker passes the point. Points: mid_epoch (after the epoch's first
    step), validation (after its first batch), checkpoint_write (model.pt written, the rest not),
    after_checkpoint (complete, before the epoch is reported)."""

    point: str
    epoch: int
    action: str
    flag: str


def fault_hook_from_env(env: dict | None = None) -> FaultHook | None:
    env = os.environ if env is None else env
    spec = env.get("AACRAY_TEST_HOOK")
    if not spec:
        return None
    parts = spec.split(":")
    flag = env.get("AACRAY_TEST_HOOK_FLAG")
    if len(parts) not in (2, 3) or parts[0] not in HOOK_POINTS or not parts[1].isdigit() or not flag:
        raise ValueError(
            f"AACRAY_TEST_HOOK={spec!r}: expected POINT:EPOCH[:ACTION] with POINT in {HOOK_POINTS}, "
            f"ACTION in {HOOK_ACTIONS}, and AACRAY_TEST_HOOK_FLAG naming a file; unset it outside tests"
        )
    action = parts[2] if len(parts) == 3 else "kill"
    if action not in HOOK_ACTIONS:
        raise ValueError(f"AACRAY_TEST_HOOK={spec!r}: action {action!r} is not one of {HOOK_ACTIONS}")
    return FaultHook(parts[0], int(parts[1]), action, flag)


def fire_hook(hook: FaultHook | None, point: str, epoch: int) -> None:
    if hook is None or (hook.point, hook.epoch) != (point, epoch):
        return
    try:
        os.close(os.open(hook.flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    print(f"[aacray.train] test hook {point}:{epoch} fired: {hook.action}", flush=True)
    if hook.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if hook.action == "raise":
        raise InjectedFault(f"test hook {point}:{epoch}")
    while True:
        time.sleep(1)


# --------------------------------------------------------------------------------------
# The per-worker loop
# --------------------------------------------------------------------------------------


class _ShardRows:
    """This worker's (audio_id, frames) rows of a dataset shard, read once when cached."""

    def __init__(self, cache: bool):
        self.cache = cache
        self.rows: dict[str, list] = {}

    def __call__(self, name: str) -> list[tuple[str, np.ndarray]]:
        import ray.train

        if name in self.rows:
            return self.rows[name]
        rows = []
        for batch in ray.train.get_dataset_shard(name).iter_batches(batch_size=256, batch_format="pyarrow"):
            ids, frames = _batch_frames(batch)
            rows.extend(zip(ids, frames, strict=True))
        if self.cache:
            self.rows[name] = rows
        return rows


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    st = _set_up_worker(config)
    run_epochs(st, config, _ShardRows(st.cfg.cache_shard), ray.train.report)


def run_epochs(st: TrainState, config: dict, rows: Callable[[str], list], report: Callable[[dict], None]) -> None:
    """The epochs left after st.start_epoch: train, validate, log, checkpoint when due,
    report. `rows(name)` gives this worker's (audio_id, frames) rows of "train" or "val"."""
    for epoch in range(st.start_epoch, st.cfg.epochs):
        stats = train_epoch(st, rows("train"), epoch)
        validate(st, rows("val"), stats, epoch)
        metrics = epoch_metrics(st, epoch, stats)
        st.history.append(metrics)
        _end_epoch(st, config, metrics)
        report(metrics)


def _set_up_worker(config: dict) -> TrainState:
    import ray.train
    from ray.train.torch import prepare_model

    cfg = from_dict(TrainConfig, config["cfg"])
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    ctx = ray.train.get_context()
    tok = WordTokenizer.from_str(config["tokenizer"])
    st = new_train_state(cfg, tok, config["train_tokens"], config["val_tokens"], ctx.get_world_rank(), ctx.get_world_size())
    st.hook = config.get("fault_hook")
    _set_up_selection(st, config, lambda: read_embeddings(cfg.embeddings, cfg.val_subsets))
    # on the device (and in DDP) before the optimizer state is loaded, so that state lands
    # on the parameters' device
    st.step = prepare_model(st.step)
    restore(st, config["run"], config["resume_epoch"])
    return st


def _set_up_selection(st: TrainState, config: dict, val_clips: Callable[[], EmbeddingSet]) -> None:
    """Give rank 0 what its selection criterion needs (nothing for last and val_loss)."""
    if st.rank != 0 or st.cfg.select_by in ("last", "val_loss"):
        return
    st.val_texts = config["val_texts"]
    st.val_clips = functools.cache(val_clips)


def restore(st: TrainState, run: str, planned: int) -> None:
    """Continue from the newest complete checkpoint under `run`: the driver's choice on
    the first start, a newer one after a worker restart (Ray's own list is not used)."""
    found = [newest_complete(run) if st.rank == 0 else None]
    if st.world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(found, src=0)  # every rank loads the folder rank 0 chose
    if found[0] is None:
        if planned:
            raise RuntimeError(f"the checkpoint of epoch {planned} that the driver chose is gone from {run}")
        return
    _, folder = found[0]
    state = ckpt_lib.load_state(folder)
    epoch = int(state["epoch"])
    if epoch < planned or state["tokenizer_sha256"] != ckpt_lib.tokenizer_digest(st.tok):
        raise RuntimeError(f"{folder}: not the run's checkpoint (epoch {epoch}, the driver chose {planned} or later)")
    st.model.load_state_dict(state["model"])
    st.opt.load_state_dict(state["optimizer"])
    st.sched.load_state_dict(state["scheduler"])
    st.history = list(state["history"])
    assert [h["epoch"] for h in st.history] == list(range(1, epoch + 1)), f"{folder}: history {st.history}"
    st.resumes = [*state.get("resumes", []), {"epoch": epoch, "checkpoint": folder}]
    st.start_epoch = epoch
    if st.rank == 0:
        print(f"[aacray.train] resumed from the checkpoint of epoch {epoch}: {folder}", flush=True)


def _end_epoch(st: TrainState, config: dict, metrics: dict) -> None:
    """Rank 0: on a checkpointed epoch, add the selection criterion's value to its history
    row; log the epoch; write its checkpoint when due."""
    cfg, done = st.cfg, metrics["epoch"]
    if st.rank != 0:
        return
    due = selection.is_checkpointed(done, cfg.epochs, cfg.checkpoint_every)
    value = None
    if due and st.val_clips is not None:
        value = selection.criterion_value(cfg.select_by, st.model, st.tok, st.val_clips(), st.val_tokens, st.val_texts)
    if value is not None:
        metrics[cfg.select_by] = value
    shown = f" {cfg.select_by} {value:.4f}" if value is not None else ""
    print(
        f"[aacray.train] epoch {done}/{cfg.epochs} train_loss {metrics['train_loss']:.3f} "
        f"val_loss {metrics['val_loss']:.3f}{shown} {metrics['samples_per_s']:.0f} samples/s",
        flush=True,
    )
    if due:
        _write_checkpoint(st, config, done)


def _write_checkpoint(st: TrainState, config: dict, done: int) -> None:
    run = config["run"]
    folder = storage.join(run, ckpt_lib.run_checkpoint_name(done))
    storage.remove(folder)  # a half-written one from a crashed attempt: no stale file survives

    def written(name: str) -> None:
        if name == "model.pt":
            fire_hook(st.hook, "checkpoint_write", done)

    extra = {"optimizer": st.opt.state_dict(), "scheduler": st.sched.state_dict(), "history": st.history, "resumes": st.resumes}
    ckpt_lib.save(folder, st.model, st.tok, config["config_yaml"], done, extra, on_file_written=written)
    fire_hook(st.hook, "after_checkpoint", done)
    best = selection.select(st.history, st.cfg.select_by, st.cfg.epochs, st.cfg.checkpoint_every).epoch
    prune_checkpoints(run, done, also_keep=best)


# --------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------


def _embedding_dataset(emb_uri: str, audio_ids: list[str]):
    import pyarrow.compute as pc
    import ray.data

    files = storage.table_files(emb_uri, "embeddings")
    fs, _ = storage.arrow_fs(emb_uri)
    paths = [storage.get_fs(f)[1] for f in files]
    keep = pa.array(sorted(audio_ids))
    ds = ray.data.read_parquet(paths, filesystem=fs).select_columns(["audio_id", "embedding"])

    def _filter(batch: pa.Table) -> pa.Table:
        return batch.filter(pc.is_in(batch.column("audio_id"), value_set=keep))

    return ds.map_batches(_filter, batch_format="pyarrow")


def heldout_figures(model: CaptionDecoder, tok: WordTokenizer, val: EmbeddingSet, val_tokens: dict, seed: int) -> dict:
    """Matched vs random mismatched caption on held-out clips (share matched lower)."""
    rng = np.random.default_rng(seed)
    ids = [a for a in val.audio_ids if a in val_tokens]
    if len(ids) < 2:
        return {"heldout_pairs": 0, "matched_lower_share": float("nan")}
    index = val.index()
    frames, caps_m, caps_x = [], [], []
    for i, a in enumerate(ids):
        for c in val_tokens[a]:
            other = ids[(i + 1 + rng.integers(len(ids) - 1)) % len(ids)]
            frames.append(val.frames[index[a]])
            caps_m.append(c)
            caps_x.append(val_tokens[other][rng.integers(len(val_tokens[other]))])
    x, mask = pad_frames(frames)
    with torch.inference_mode():
        lm = pair_loss(model, x, mask, pad_tokens(caps_m, tok.pad_id), tok.pad_id)
        lx = pair_loss(model, x, mask, pad_tokens(caps_x, tok.pad_id), tok.pad_id)
    return {"heldout_pairs": len(caps_m), "matched_lower_share": float((lm < lx).float().mean())}


@dataclass
class TrainJob:
    """The driver's state between the phases of run_train."""

    cfg: TrainConfig
    run: str  # OUTPUT/ray_train: the checkpoints
    prep: Prepared
    train_es: EmbeddingSet
    val_es: EmbeddingSet
    n_params: int
    resume: ResumePoint = field(default_factory=ResumePoint)
    t0: float = field(default_factory=time.time)


def run_train(cfg: TrainConfig, fit: Callable[[TrainJob], None] | None = None) -> dict:
    """The job: read and check, plan the resume, fit (on Ray Train; `fit=fit_in_process`
    runs the same loop without Ray), commit the output."""
    job = _load_inputs(cfg)
    job.resume = plan_resume(cfg, job.prep.tokenizer, job.run)
    fit = fit or fit_on_ray
    if fit is fit_on_ray and job.resume.epoch < cfg.epochs:
        _start_ray(cfg)  # before the old output is invalidated
    _begin_output(job)
    if job.resume.epoch < cfg.epochs:
        fit(job)
    else:
        log.info("all %d epochs are in %s: nothing left to train", cfg.epochs, job.resume.checkpoint)
    return _finish(job, _last_checkpoint(job))


def _load_inputs(cfg: TrainConfig) -> TrainJob:
    """Read and check the inputs, build the vocabulary (nothing is written yet)."""
    why = selection.unavailable(cfg.select_by)
    if why:
        raise BadInputError(f"select_by={cfg.select_by} cannot run here: {why}; or choose another select_by ({', '.join(selection.CRITERIA)})")
    captions = read_captions(cfg.embeddings)
    train_es = read_embeddings(cfg.embeddings, cfg.train_subsets)
    val_es = read_embeddings(cfg.embeddings, cfg.val_subsets)
    prep = prepare(cfg, train_es, val_es, captions)
    n_pairs = sum(len(v) for v in prep.train_tokens.values())
    log.info(
        "train_decoder: %d train clips (%d captions), %d val clips, vocabulary %d words",
        len(prep.train_tokens), n_pairs, len(prep.val_tokens), prep.tokenizer.vocab_size,
    )
    n_params = CaptionDecoder(cfg.model, prep.tokenizer.vocab_size, prep.tokenizer.pad_id).num_trainable_parameters()
    print(f"[aacray.train] decoder: {n_params / 1e6:.2f}M trainable parameters", flush=True)
    # workers may run in another directory: give them the run folder as an absolute path
    out = cfg.output if storage.is_remote(cfg.output) else os.path.abspath(cfg.output)
    return TrainJob(cfg, storage.join(out, "ray_train"), prep, train_es, val_es, n_params)


def _begin_output(job: TrainJob) -> None:
    out, r = job.cfg.output, job.resume
    storage.remove(storage.join(out, storage.MANIFEST))
    storage.write_text(storage.join(out, "config.yaml"), dump_yaml(job.cfg))
    storage.write_json(storage.join(out, "quarantine.json"), job.prep.quarantine)
    if r.checkpoint:
        log.info("resuming from the checkpoint of epoch %d: %s", r.epoch, r.checkpoint)
    else:
        log.info("training from epoch 1 (no checkpoint under %s)", job.run)


def _loop_config(job: TrainJob) -> dict:
    """What every worker gets (train_loop_config): plain, picklable values."""
    cfg, prep = job.cfg, job.prep
    return {
        "cfg": to_dict(cfg),
        "config_yaml": dump_yaml(cfg),
        "tokenizer": prep.tokenizer.to_str(),
        "train_tokens": prep.train_tokens,
        "val_tokens": prep.val_tokens,
        "val_texts": prep.val_texts,
        "run": job.run,
        "resume_epoch": job.resume.epoch,
        "fault_hook": fault_hook_from_env(),
    }


TRAIN_SETTINGS = {"CPU": "cpus_per_worker", "GPU": "use_gpu", "count": "num_workers", "no GPU": "use_gpu: false"}
"""The setting behind each resource a Ray Train worker asks for (`stage.check_nodes_host`)."""


def _start_ray(cfg: TrainConfig) -> None:
    """Start or join Ray, and refuse a worker group its nodes cannot host: Ray Train starts
    the workers together, and its data reads need a CPU beside them, or both wait forever."""
    from aacray.runtime import init_ray
    from aacray.stage import check_nodes_host

    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    demand = {"CPU": cfg.cpus_per_worker, "GPU": 1.0 if cfg.use_gpu else 0.0}
    check_nodes_host("train_decoder", demand, TRAIN_SETTINGS, cfg.num_workers, together=True, spare_cpus=1)


def fit_on_ray(job: TrainJob) -> None:
    """Ray Train (TorchTrainer, DDP) over the embedding Parquet, from the resume point, on
    the Ray `run_train` started (`_start_ray`)."""
    import ray.data
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from aacray.runtime import train_logging_config

    cfg = job.cfg
    # per-epoch progress is printed by rank 0; Ray Data's own bars would repeat every epoch
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Ray's checkpoint list (module docstring) is not used, and one left by an older aacray
    # may name folders that are gone, which Ray refuses at start
    storage.remove(storage.join(job.run, "checkpoint_manager_snapshot.json"))
    fs, out_root = storage.arrow_fs(cfg.output)
    TorchTrainer(
        train_loop_per_worker,
        train_loop_config=_loop_config(job),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
        ),
        run_config=RunConfig(
            name="ray_train",
            storage_path=out_root,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            logging_config=train_logging_config(),
        ),
        datasets={
            "train": _embedding_dataset(cfg.embeddings, list(job.prep.train_tokens)),
            "val": _embedding_dataset(cfg.embeddings, list(job.prep.val_tokens)),
        },
        dataset_config=DataConfig(datasets_to_split=["train", "val"]),
    ).fit()


def fit_in_process(job: TrainJob) -> None:
    """The fit without Ray: one worker (rank 0 of 1) in this process, on the embeddings
    the driver read, through the same loop, checkpoints and fault hooks as a Ray worker;
    for tests and debugging. Rows come in the Parquet order a Ray shard has."""
    config = _loop_config(job)
    st = new_train_state(job.cfg, job.prep.tokenizer, job.prep.train_tokens, job.prep.val_tokens)
    st.hook = config["fault_hook"]
    _set_up_selection(st, config, lambda: job.val_es)
    restore(st, job.run, job.resume.epoch)
    rows = {
        "train": [(a, f) for a, f in zip(job.train_es.audio_ids, job.train_es.frames, strict=True) if a in st.train_tokens],
        "val": [(a, f) for a, f in zip(job.val_es.audio_ids, job.val_es.frames, strict=True) if a in st.val_tokens],
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(job.cfg.cpus_per_worker)))  # as on a worker: same sums
    try:
        run_epochs(st, config, rows.__getitem__, lambda metrics: None)
    finally:
        torch.set_num_threads(threads)


def _last_checkpoint(job: TrainJob) -> str:
    newest = newest_complete(job.run)
    if newest is None or newest[0] != job.cfg.epochs:
        raise RuntimeError(
            f"training ended without a complete checkpoint of epoch {job.cfg.epochs} under {job.run} "
            f"(the newest complete one: {newest})"
        )
    return newest[1]


def _selected_checkpoint(job: TrainJob, history: list[dict]) -> tuple[selection.Selected, str]:
    """The epoch select_by picks from the full history, and its complete checkpoint."""
    cfg = job.cfg
    chosen = selection.select(history, cfg.select_by, cfg.epochs, cfg.checkpoint_every)
    folder = storage.join(job.run, ckpt_lib.run_checkpoint_name(chosen.epoch))
    why = ckpt_lib.incomplete_reason(folder)
    if why is not None:
        raise RuntimeError(f"select_by={cfg.select_by} chose epoch {chosen.epoch}, but its checkpoint {folder} is unusable: {why}")
    log.info("selected epoch %d by %s (%s): %s", chosen.epoch, cfg.select_by, chosen.value, folder)
    return chosen, folder


def _finish(job: TrainJob, last_ckpt: str) -> dict:
    """Copy the selected epoch's checkpoint beside the manifest, write metrics.json (the
    whole history, from the last checkpoint), commit."""
    cfg, out = job.cfg, job.cfg.output
    state = ckpt_lib.load_state(last_ckpt)
    history = state["history"]
    chosen, source = _selected_checkpoint(job, history)
    final = storage.join(out, "checkpoint")
    storage.remove(final)
    ckpt_lib.copy(source, final)
    model, tok, _ = ckpt_lib.load(final)
    figs = heldout_figures(model, tok, job.val_es, job.prep.val_tokens, cfg.seed)
    first, last = history[0]["val_loss"], history[-1]["val_loss"]
    r = job.resume
    summary = {
        "output": out,
        "trainable_parameters": job.n_params,
        "vocab_size": tok.vocab_size,
        "epochs": len(history),
        "resumed_from": {"epoch": r.epoch, "checkpoint": r.checkpoint} if r.checkpoint else None,
        "val_loss_first": round(first, 4),
        "val_loss_last": round(last, 4),
        "val_loss_drop": round(1 - last / first, 4),
        "selected_epoch": chosen.epoch,
        "selected_by": cfg.select_by,
        "heldout_pairs": figs["heldout_pairs"],
        "matched_lower_share": round(figs["matched_lower_share"], 4),
        "train_samples_per_s": round(float(np.median([h["samples_per_s"] for h in history])), 1),
        "num_workers": cfg.num_workers,
        "quarantined": len(job.prep.quarantine),
        "wall_seconds": round(time.time() - job.t0, 1),
    }
    resumes = state.get("resumes", [])
    checkpointed = [h["epoch"] for h in history if selection.is_checkpointed(h["epoch"], cfg.epochs, cfg.checkpoint_every)]
    record = {"summary": summary, "selected": chosen.record(checkpointed), "history": history, "resumes": resumes}
    storage.write_json(storage.join(out, "metrics.json"), record)
    storage.commit_output(out, "train_decoder", {"checkpoint": "checkpoint", **summary})
    print(
        f"[aacray.train] val loss {first:.3f} -> {last:.3f} ({summary['val_loss_drop']:.0%} lower); "
        f"matched caption beats a random one on {summary['matched_lower_share']:.1%} of "
        f"{summary['heldout_pairs']} held-out pairs; {summary['train_samples_per_s']} samples/s; "
        f"kept epoch {chosen.epoch} (select_by={cfg.select_by})",
        flush=True,
    )
    return summary
