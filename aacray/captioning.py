"""Stage: caption audios by beam search on Ray Data actors; AAC metrics through aac-metrics.

Captions. The audio ids of the chosen subsets, sorted by length, are the rows of a Ray
Data pipeline; an actor pool captions them in batches. Each actor loads the checkpoint and
the subset's embeddings once (as score_matrix's actors hold the audio index) and runs the
batched `decoding.beam_search` (paper 3.3: beam search, no word twice unless a stopword).
(Reading the Parquet with Ray Data tasks instead would deadlock a small cluster whose CPUs
the actor pool already holds.) The driver collects (audio_id, caption, score) into the
`captions` table; score is the caption's log-likelihood (see decoding.py).

Metrics. aacray/metrics_env.py: every number from aac-metrics itself, one metric at a time;
a metric whose Java, jars or models are missing here is skipped with the reason and the fix.

Phases (aacray/stage.py): plan (checkpoint, audios and references checked in the driver,
nothing started), set up (Ray, then `Output.begin`), run (beam search on the actor pool),
reduce (the captions table, the metrics), commit (metrics.json, the manifest last).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib.metadata import version

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from aacray import checkpoint as ckpt_lib
from aacray import stage, storage
from aacray.config import CaptionConfig, from_dict, to_dict
from aacray.decoder import pad_frames
from aacray.decoding import beam_search_n_best
from aacray.embeddings import check_embeddings, duplicate_ids, read_captions, read_embeddings
from aacray.errors import BadInputError
from aacray.metrics_env import MAIN_KEY, evaluate_captions
from aacray.shortlist import word_profiles
from aacray.text import normalize

# --------------------------------------------------------------------------------------
# The printed table
# --------------------------------------------------------------------------------------

TABLE1 = (("METEOR", "meteor"), ("CIDEr-D", "cider_d"), ("SPICE", "spice"), ("SPIDEr", "spider"), ("SPIDEr-FL", "spider_fl"), ("FENSE", "fense"), ("Vocab", "vocab"))
EXTRA = (("BLEU-1", "bleu_1"), ("BLEU-4", "bleu_4"), ("ROUGE-L", "rouge_l"))


def format_table(metrics: dict) -> str:
    """A table like the paper's Table 1 (METEOR CIDEr-D SPICE SPIDEr SPIDEr-FL), plus FENSE,
    Vocab and the BLEU/ROUGE extras; n/a for a skipped metric, - for one not asked for."""
    scores, skipped = metrics["metrics"], metrics["skipped"]

    def cell(name: str) -> str:
        key = MAIN_KEY.get(name, name)
        if key in scores:
            v = scores[key]
            return f"{v:.0f}" if name == "vocab" else f"{v:.3f}"
        return "n/a" if name in skipped else "-"

    cols = [c for c in TABLE1 + EXTRA if c[1] in metrics["requested"] or MAIN_KEY.get(c[1], c[1]) in scores]
    head = " ".join(f"{label:>9}" for label, _ in cols)
    row = " ".join(f"{cell(name):>9}" for _, name in cols)
    lines = [
        f"AAC metrics on {metrics['n_audios_evaluated']} audios ({metrics['n_references']} references); "
        f"beam {metrics['beam_size']}, {metrics['min_len']}-{metrics['max_len']} words; "
        f"tokenizer: {metrics['tokenizer']}",
        head,
        row,
    ]
    for name, why in skipped.items():
        lines.append(f"n/a {name}: {why}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# The Ray Data actor
# --------------------------------------------------------------------------------------


class CaptionActor:
    """A batch of audio ids -> (audio_id, caption, score). Holds the subset's embeddings.
    describe (score_matrix's shortlist, `describe`): also every beam's text, best first
    ("beams"), and with "profile" the decoder's word profile along the best one
    (`shortlist.word_profiles`)."""

    def __init__(self, cfg_dict: dict, describe: str | None = None):
        cfg = from_dict(CaptionConfig, cfg_dict)
        self.device, self.model, self.tok, _ = stage.actor_setup(cfg.actors, cfg.checkpoint, cfg.task)
        audio = read_embeddings(cfg.audio, cfg.subsets)
        bad = check_embeddings(audio, "caption")
        if bad:
            raise BadInputError(f"embeddings no caption can be made from: {bad[:10]}")
        self.frames = dict(zip(audio.audio_ids, audio.frames, strict=True))
        self.cfg, self.describe = cfg, describe

    def __call__(self, batch: dict) -> dict:
        ids = [str(a) for a in batch["audio_id"]]
        x, mask = pad_frames([self.frames[a] for a in ids])
        x, mask = x.to(self.device), mask.to(self.device)
        c = self.cfg
        beams = beam_search_n_best(
            self.model, x, mask, self.tok,
            beam_size=c.beam_size, min_len=c.min_len, max_len=c.max_len, forbid_repeats=c.forbid_repeats,
        )
        out = {
            "audio_id": np.array(ids, dtype=object),
            "caption": np.array([b[0].text for b in beams], dtype=object),
            "score": np.array([b[0].score for b in beams], dtype=np.float32),
        }
        if self.describe:
            out["beams"] = np.empty(len(ids), dtype=object)  # a list a row, whatever their lengths
            for i, b in enumerate(beams):
                out["beams"][i] = [g.text for g in b]
        if self.describe == "profile":
            with torch.inference_mode():
                memory = self.model.encode(x, mask)
            out["profile"] = word_profiles(self.model, memory, mask, [b[0].tokens for b in beams])
        return out


def map_audios(cfg: CaptionConfig, audio_ids: list[str], n_frames: dict[str, int], describe: str | None = None):
    """Beam search over audio_ids on the actor pool -> ({audio_id: its row}, seconds). Rows
    go sorted by length, so a batch pads little; each actor holds the subset's embeddings,
    like score_matrix's index."""
    import ray.data  # here only: the rest of the module imports no Ray

    rows = sorted(audio_ids, key=lambda a: (n_frames[a], a))
    ds = ray.data.from_items(
        [{"audio_id": a} for a in rows],
        override_num_blocks=max(1, min(len(rows), cfg.actors.num_actors * 4)),
    )
    ds = stage.map_actors(ds, CaptionActor, {"cfg_dict": to_dict(cfg), "describe": describe}, cfg.actors)
    t0 = time.time()
    got = {str(r["audio_id"]): r for r in ds.iter_rows()}
    seconds = time.time() - t0
    if set(got) != set(audio_ids):
        lost = sorted(set(audio_ids) - set(got))
        raise RuntimeError(f"{len(lost)} audio(s) came back without a caption, e.g. {lost[:5]}")
    return got, seconds


# --------------------------------------------------------------------------------------
# The job: plan, set up, run, reduce, commit
# --------------------------------------------------------------------------------------


@dataclass
class CaptionPlan:
    """What the driver checked before anything runs."""

    audio_ids: list[str]
    """The audios to caption, in table order."""
    n_frames: dict[str, int]
    references: dict[str, list[str]]
    """audio_id -> its reference captions ({} without `references`)."""
    checkpoint: dict
    """The checkpoint's info (folder, epoch, tokenizer digest)."""


def references_for(uri: str, audio_ids: list[str]) -> dict[str, list[str]]:
    """audio_id -> its reference captions (ordered by caption_id), for the given audios."""
    t = read_captions(uri, None)
    wanted = set(audio_ids)
    rows = sorted(
        (a, c, txt)
        for c, txt, a in zip(t.column("caption_id").to_pylist(), t.column("text").to_pylist(), t.column("audio_id").to_pylist(), strict=True)
        if a in wanted and txt and normalize(txt)
    )
    out: dict[str, list[str]] = {}
    for a, _, txt in rows:
        out.setdefault(a, []).append(txt)
    return out


def plan_caption(cfg: CaptionConfig) -> CaptionPlan:
    """The checkpoint and the audios to caption, checked; raises BadInputError naming them."""
    model, _, info = ckpt_lib.load(cfg.checkpoint, task=cfg.task)
    if cfg.max_len + 1 > model.cfg.max_len:
        raise BadInputError(
            f"max_len={cfg.max_len} words + bos exceed the decoder's max_len={model.cfg.max_len} "
            f"positions ({info['folder']}); lower max_len"
        )
    ids_t = storage.read_table(cfg.audio, "embeddings", columns=["audio_id", "subset", "n_frames"])
    if cfg.subsets is not None:
        ids_t = ids_t.filter(pc.is_in(ids_t.column("subset"), pa.array(cfg.subsets, pa.string())))
    audio_ids = ids_t.column("audio_id").to_pylist()
    n_frames = dict(zip(audio_ids, ids_t.column("n_frames").to_pylist(), strict=True))
    bad = []
    if not audio_ids:
        bad.append(f"no audio in {cfg.audio} for subsets {cfg.subsets}")
    dups = duplicate_ids(audio_ids)
    if dups:
        bad.append(f"duplicate audio ids: {dups[:10]}")
    empty = [a for a, n in zip(audio_ids, ids_t.column("n_frames").to_pylist(), strict=True) if not n]
    if empty:
        bad.append(f"audios with no frames: {empty[:10]}")
    if bad:
        raise BadInputError("caption refused its inputs, nothing was decoded:\n  " + "\n  ".join(bad))
    refs = references_for(cfg.references, audio_ids) if cfg.references else {}
    return CaptionPlan(audio_ids, n_frames, refs, info)


def decode(cfg: CaptionConfig, plan: CaptionPlan) -> tuple[dict[str, tuple[str, float]], float]:
    """Beam search on the actor pool: (audio_id -> (caption, score), seconds)."""
    rows, seconds = map_audios(cfg, plan.audio_ids, plan.n_frames)
    return {a: (str(r["caption"]), float(r["score"])) for a, r in rows.items()}, seconds


def captions_table(got: dict[str, tuple[str, float]]) -> pa.Table:
    order = sorted(got)
    return pa.table(
        {
            "audio_id": pa.array(order, pa.string()),
            "caption": pa.array([got[a][0] for a in order], pa.string()),
            "score": pa.array([got[a][1] for a in order], pa.float32()),
        }
    )


def caption_metrics(cfg: CaptionConfig, plan: CaptionPlan, got: dict[str, tuple[str, float]], seconds: float) -> dict:
    """metrics.json: the decoding, the counts and aac-metrics' scores against the references."""
    refs = plan.references
    order = sorted(got)
    evaluated = [a for a in order if a in refs]
    metrics: dict = {
        "requested": list(cfg.metrics),
        "n_audios": len(order),
        "n_audios_evaluated": len(evaluated),
        "n_audios_without_references": len(order) - len(evaluated),
        "n_references": sum(len(refs[a]) for a in evaluated),
        "beam_size": cfg.beam_size,
        "min_len": cfg.min_len,
        "max_len": cfg.max_len,
        "forbid_repeats": cfg.forbid_repeats,
        "decode_seconds": round(seconds, 2),
        "checkpoint": plan.checkpoint,
    }
    if evaluated:
        m = evaluate_captions(
            [got[a][0] for a in evaluated], [refs[a] for a in evaluated], cfg.metrics,
            cfg.tokenizer, cfg.metrics_cache, cfg.java, cfg.metrics_device,
        )
        metrics.update(
            metrics=m.scores, skipped=m.skipped, tokenizer=m.tokenizer, java=m.java,
            metrics_cache=m.cache_path, linked_from_pycocoevalcap=m.linked_from_pycocoevalcap,
        )
    else:
        why = "no references given (references: null)" if not cfg.references else (
            f"none of the {len(order)} audios has a reference caption in {cfg.references}"
        )
        metrics.update(metrics={}, skipped={m: why for m in cfg.metrics}, tokenizer=None)
    metrics["aac_metrics_version"] = version("aac-metrics")
    return metrics


def run_caption(cfg: CaptionConfig) -> dict:
    t_start = time.time()
    plan = plan_caption(cfg)  # nothing runs on inputs that fail their checks
    stage.start_ray("caption", cfg.ray, cfg.actors)  # before the old output is invalidated
    out = stage.Output(cfg.output, "caption", ["captions"]).begin(cfg)
    got, seconds = decode(cfg, plan)
    out.table("captions", captions_table(got))
    metrics = caption_metrics(cfg, plan, got, seconds)
    out.json("metrics.json", metrics)
    out.commit({"metrics": "metrics.json"})
    print(format_table(metrics), flush=True)
    return {
        "output": cfg.output,
        "n_audios": len(got),
        "metrics": metrics["metrics"],
        "skipped": sorted(metrics["skipped"]),
        "wall_seconds": round(time.time() - t_start, 1),
    }
