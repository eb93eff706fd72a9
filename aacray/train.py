"""Stage: fit the projection + decoder on Ray Train from the embedding Parquet.

- The driver reads and checks the inputs before any worker starts (bad captions, bad
  embeddings, captions without audio: an error naming them, or quarantine by config), builds
  the word vocabulary on the training captions, and tokenises every caption once.
- Workers stream their shard of the embedding Parquet (`ray.train.get_dataset_shard`),
  draw one of each clip's captions per epoch, and run the paper's recipe under DDP:
  AdamW (no decay on biases), cosine decay per epoch, clip 1, label smoothing, mixup,
  SpecAugment on frame embeddings.
- Every `checkpoint_every` epochs rank 0 reports a checkpoint (weights, optimizer,
  scheduler, epoch, metric history, tokenizer, resolved config) to the run's storage
  path. Re-running with the same output resumes from the latest one (Ray Train restores
  the run's checkpoint list from storage); a worker that dies mid-run is restarted from
  it when `max_failures` > 0.
- The output commits with its manifest last; `checkpoint/` holds the final model.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from aacray import checkpoint as ckpt_lib
from aacray import storage
from aacray.config import TrainConfig, dump_yaml, from_dict, to_dict
from aacray.decoder import CaptionDecoder, pair_loss, train_loss
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


# --------------------------------------------------------------------------------------
# Driver-side checks and tokenisation (pure, testable without Ray)
# --------------------------------------------------------------------------------------


def prepare(cfg: TrainConfig, train: EmbeddingSet, val: EmbeddingSet, captions: pa.Table) -> Prepared:
    bad: list[dict] = []
    bad_audio = {}
    for split, es in (("train", train), ("val", val)):
        for aid, why in check_embeddings(es, split):
            bad.append({"item": f"audio {aid}", "reason": why})
            bad_audio[aid] = why
    subset_of = {a: "train" for a in train.audio_ids} | {a: "val" for a in val.audio_ids}
    rows = captions.to_pylist()
    wanted = set(cfg.train_subsets) | set(cfg.val_subsets)
    per_split: dict[str, list[tuple[str, str, str]]] = {"train": [], "val": []}
    for r in rows:
        if r["subset"] not in wanted:
            continue
        cid, aid, text = r["caption_id"], r["audio_id"], r["text"] or ""
        if aid is None or aid not in subset_of:
            bad.append({"item": f"caption {cid}", "reason": f"its audio {aid!r} has no embedding"})
            continue
        if aid in bad_audio:
            bad.append({"item": f"caption {cid}", "reason": f"its audio {aid} is bad ({bad_audio[aid]})"})
            continue
        if not normalize(text):
            bad.append({"item": f"caption {cid}", "reason": f"empty after normalisation: {text!r}"})
            continue
        per_split[subset_of[aid]].append((cid, aid, text))
    tok = WordTokenizer.build([t for _, _, t in per_split["train"]], min_freq=cfg.min_freq)
    out: dict[str, dict[str, list[list[int]]]] = {"train": {}, "val": {}}
    max_tokens = cfg.model.max_len + 1  # inputs (bos + words) fit max_len positions
    for split, items in per_split.items():
        for cid, aid, text in items:
            ids = tok.encode(text)
            if all(i == tok.unk_id for i in ids[1:-1]):
                bad.append({"item": f"caption {cid}", "reason": f"no in-vocabulary word: {text!r}"})
                continue
            if len(ids) > max_tokens:
                ids = ids[: max_tokens - 1] + [tok.eos_id]
            out[split].setdefault(aid, []).append(ids)
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
    return Prepared(tok, out["train"], out["val"], bad)


def pad_frames(frames: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (S_i, E) -> (B, S, E) float32 and pad mask (B, S), True on pad."""
    S = max(f.shape[0] for f in frames)
    E = frames[0].shape[1]
    x = torch.zeros(len(frames), S, E)
    mask = torch.ones(len(frames), S, dtype=torch.bool)
    for i, f in enumerate(frames):
        x[i, : f.shape[0]] = torch.tensor(np.asarray(f, dtype=np.float32))
        mask[i, : f.shape[0]] = False
    return x, mask


def pad_tokens(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on every parameter except biases (paper 3.3)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") else decay).append(p)
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
# The per-worker loop
# --------------------------------------------------------------------------------------


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import torch.distributed as dist
    from ray.train import Checkpoint
    from ray.train.torch import prepare_model

    cfg = from_dict(TrainConfig, config["cfg"])
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    tok = WordTokenizer.from_str(config["tokenizer"])
    train_tokens, val_tokens = config["train_tokens"], config["val_tokens"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = CaptionDecoder(cfg.model, tok.vocab_size, tok.pad_id)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    start_epoch, history = 0, []
    restored = ray.train.get_checkpoint()
    if restored:
        with restored.as_directory() as d:
            state = ckpt_lib.load_state(d)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, history = int(state["epoch"]), list(state.get("history", []))
        if rank == 0:
            print(f"[aacray.train] resumed from the checkpoint of epoch {start_epoch}", flush=True)
    step = prepare_model(_TrainStep(model, cfg))
    device = next(model.parameters()).device
    per_worker = max(1, cfg.batch_size // world)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    def all_sum(*xs: float) -> list[float]:
        t = torch.tensor(xs, dtype=torch.float64)
        if world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def load_shard(shard) -> list[tuple[str, np.ndarray]]:
        rows = []
        for batch in shard.iter_batches(batch_size=256, batch_format="pyarrow"):
            ids, frames = _batch_frames(batch)
            rows.extend(zip(ids, frames, strict=True))
        return rows

    cache: dict[str, list] = {}

    def rows_of(name: str, shard) -> list[tuple[str, np.ndarray]]:
        if not cfg.cache_shard:
            return load_shard(shard)
        if name not in cache:
            cache[name] = load_shard(shard)
        return cache[name]

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        rng = np.random.default_rng([cfg.seed, epoch, rank])
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + rank)
        rows = rows_of("train", train_shard)
        t0, n_seen, loss_sum, n_steps = time.time(), 0, 0.0, 0
        order = rng.permutation(len(rows))
        for b in range(0, len(order), per_worker):
            chosen = [rows[i] for i in order[b : b + per_worker]]
            ids = [a for a, _ in chosen]
            caps = draw_captions(ids, train_tokens, rng)
            x, mask = pad_frames([f for _, f in chosen])
            tokens = pad_tokens(caps, tok.pad_id)
            loss = step(x.to(device), mask.to(device), tokens.to(device), gen)
            check_finite(loss, epoch + 1, rank)
            optimizer_step(model, opt, loss, cfg.grad_clip)
            n_seen += len(ids)
            loss_sum += loss.item()
            n_steps += 1
        train_seconds = time.time() - t0
        sched.step()
        # validation: mean per-pair loss over every caption of every validation clip
        model.eval()
        v_sum, v_n = 0.0, 0
        vrows = rows_of("val", val_shard)
        with torch.inference_mode():
            for b in range(0, len(vrows), per_worker):
                rep = [(f, c) for a, f in vrows[b : b + per_worker] for c in val_tokens[a]]
                x, mask = pad_frames([f for f, _ in rep])
                tokens = pad_tokens([c for _, c in rep], tok.pad_id)
                pl = pair_loss(model, x.to(device), mask.to(device), tokens.to(device), tok.pad_id)
                v_sum += float(pl.sum())
                v_n += len(rep)
        n_total, l_total, steps_total, v_sum, v_n, slowest = (*all_sum(n_seen, loss_sum, n_steps, v_sum, v_n), train_seconds)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": l_total / max(steps_total, 1),
            "val_loss": v_sum / max(v_n, 1),
            "lr": opt.param_groups[0]["lr"],
            "samples_per_s": n_total / max(slowest, 1e-9),
        }
        history.append(metrics)
        if rank == 0:
            print(
                f"[aacray.train] epoch {epoch + 1}/{cfg.epochs} train_loss {metrics['train_loss']:.3f} "
                f"val_loss {metrics['val_loss']:.3f} {metrics['samples_per_s']:.0f} samples/s",
                flush=True,
            )
        last = epoch + 1 == cfg.epochs
        if rank == 0 and (last or (epoch + 1) % cfg.checkpoint_every == 0):
            with tempfile.TemporaryDirectory() as d:
                ckpt_lib.save(
                    d,
                    model,
                    tok,
                    config["config_yaml"],
                    epoch + 1,
                    {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "history": history},
                )
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


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


def run_train(cfg: TrainConfig) -> dict:
    import ray.data
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from aacray.runtime import init_ray

    t0 = time.time()
    out = cfg.output
    captions = read_captions(cfg.embeddings)
    train_es = read_embeddings(cfg.embeddings, cfg.train_subsets)
    val_es = read_embeddings(cfg.embeddings, cfg.val_subsets)
    prep = prepare(cfg, train_es, val_es, captions)
    n_pairs = sum(len(v) for v in prep.train_tokens.values())
    log.info(
        "train_decoder: %d train clips (%d captions), %d val clips, vocabulary %d words",
        len(prep.train_tokens), n_pairs, len(prep.val_tokens), prep.tokenizer.vocab_size,
    )
    model_probe = CaptionDecoder(cfg.model, prep.tokenizer.vocab_size, prep.tokenizer.pad_id)
    n_params = model_probe.num_trainable_parameters()
    print(f"[aacray.train] decoder: {n_params / 1e6:.2f}M trainable parameters", flush=True)

    storage.remove(storage.join(out, storage.MANIFEST))
    storage.write_text(storage.join(out, "config.yaml"), dump_yaml(cfg))
    storage.write_json(storage.join(out, "quarantine.json"), prep.quarantine)

    init_ray(cfg.ray.address, cfg.ray.num_cpus)
    # per-epoch progress is printed by rank 0; Ray Data's own bars would repeat every epoch
    ray.data.DataContext.get_current().enable_progress_bars = False
    datasets = {
        "train": _embedding_dataset(cfg.embeddings, list(prep.train_tokens)),
        "val": _embedding_dataset(cfg.embeddings, list(prep.val_tokens)),
    }
    fs, run_root = storage.arrow_fs(out)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": to_dict(cfg),
            "config_yaml": dump_yaml(cfg),
            "tokenizer": prep.tokenizer.to_str(),
            "train_tokens": prep.train_tokens,
            "val_tokens": prep.val_tokens,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
        ),
        run_config=RunConfig(
            name="ray_train",
            storage_path=run_root,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train", "val"]),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint ({result.error})")
    # copy the final checkpoint beside the manifest
    final = storage.join(out, "checkpoint")
    with result.checkpoint.as_directory() as d:
        for name in os.listdir(d):
            with open(os.path.join(d, name), "rb") as f:
                storage.write_bytes(storage.join(final, name), f.read())
    model, tok, info = ckpt_lib.load(final)
    state = ckpt_lib.load_state(final)
    history = state.get("history", [])
    figs = heldout_figures(model, tok, val_es, prep.val_tokens, cfg.seed)
    first, last = history[0]["val_loss"], history[-1]["val_loss"]
    summary = {
        "output": out,
        "trainable_parameters": n_params,
        "vocab_size": tok.vocab_size,
        "epochs": len(history),
        "val_loss_first": round(first, 4),
        "val_loss_last": round(last, 4),
        "val_loss_drop": round(1 - last / first, 4),
        "heldout_pairs": figs["heldout_pairs"],
        "matched_lower_share": round(figs["matched_lower_share"], 4),
        "train_samples_per_s": round(float(np.median([h["samples_per_s"] for h in history])), 1),
        "num_workers": cfg.num_workers,
        "quarantined": len(prep.quarantine),
        "wall_seconds": round(time.time() - t0, 1),
    }
    storage.write_json(storage.join(out, "metrics.json"), {"summary": summary, "history": history})
    storage.commit_output(out, "train_decoder", {"checkpoint": "checkpoint", **summary})
    print(
        f"[aacray.train] val loss {first:.3f} -> {last:.3f} ({summary['val_loss_drop']:.0%} lower); "
        f"matched caption beats a random one on {summary['matched_lower_share']:.1%} of "
        f"{summary['heldout_pairs']} held-out pairs; {summary['train_samples_per_s']} samples/s",
        flush=True,
    )
    return summary
