"""Relation perturbations of captions (paper section 5, Tables 4 and 5) and their job.

A perturbed caption keeps the words of a real caption but changes the relation between its
sound events; a model that understands the relation should find it a worse description of
the caption's OWN audio: accuracy = share of perturbed captions whose loss on that audio is
strictly higher than the original's (0.5 is chance).

Sets (Table 4; relation phrases are matched on the normalised words of a caption):
  replace_bat      before <-> after                          (the Before-After Test)
  replace_seq2sup  {followed by, and then, then, before, after} -> {as, while}
  replace_sup2seq  {as, while} -> {followed by, and then, then, before, after}
  invert_bat       swap the propositions around before / after
  invert_seq       swap the propositions around a sequence word
  invert_sup       swap the propositions around a superposition word
(Table 5 also reports Invert on the BAT words, hence invert_bat.)

Choices worth knowing:
- Matching is on whole words, left to right, the longest phrase first, over every relation
  phrase at once: "and then" is one relation (never "and" + "then"), "thenceforth" holds
  none. It is lexical, as in the paper: the "as" of "such as" and the "while" of "a while"
  count too.
- One perturbed caption per relation occurrence per replacement: a caption with two
  relation words gives separate perturbations, each changing one relation.
- "Replaced by one of" means, by default, EVERY alternative (alternatives="all"): more
  pairs and no randomness; seq2sup gives 2 captions per occurrence, sup2seq 5.
  alternatives="random" draws one per occurrence with an rng seeded by (seed, caption id),
  so a draw does not depend on the other captions or their order.
- Invert: the two propositions are the words between the relation and the neighbouring
  relation words (of any set) or the caption's ends:
  "a man speaks then a dog barks while it rains" -> around "then":
  "a dog barks then a man speaks while it rains". No perturbation when a side is empty.
- A perturbation whose words (or, after truncation to the decoder's length, tokens) equal
  the original's is dropped and counted: it tests nothing.
- A word outside the vocabulary becomes <unk>, and a caption holding an <unk> scores badly
  whatever the audio, so a test can pass for the wrong reason (a replacement word missing
  from a small vocabulary). Every pair carries the OOV word counts of both captions, and
  each set reports its accuracy on all pairs and on the in-vocabulary ones (neither
  caption holds an OOV word).
- Losses come from the same scorer as score_matrix (`PairScorer.loss_pairs`) inside Ray
  Data actors. The pure parts (matching, perturbing, accuracies) import no Ray.
- The job's phases (aacray/stage.py): plan (inputs checked, perturbations built, pairs
  deduplicated, an actor's memory estimated), set up (Ray, the memory guard, then
  `Output.begin`), run (the actor pool), reduce (pair table, accuracies), commit. An index
  that one actor cannot hold is refused before any actor starts.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from aacray import checkpoint as ckpt_lib
from aacray import stage
from aacray.config import PerturbConfig, from_dict, to_dict
from aacray.decoder import CaptionDecoder
from aacray.embeddings import EmbeddingSet, read_captions, read_embeddings
from aacray.errors import BadInputError
from aacray.scorer import PairScorer, check_inputs, scorer_memory, tokenize
from aacray.text import WordTokenizer
from aacray.text import words as normalized_words

log = logging.getLogger("aacray.perturb")

SEQ_WORDS = ("followed by", "and then", "then", "before", "after")
"""Sequence relations (one event after the other)."""
SUP_WORDS = ("as", "while")
"""Superposition relations (events at the same time)."""
BAT_WORDS = ("before", "after")
RELATIONS = SEQ_WORDS + SUP_WORDS
"""Every relation phrase; they also bound the propositions of Invert."""

REPLACE_SETS: dict[str, dict[str, tuple[str, ...]]] = {
    "replace_bat": {"before": ("after",), "after": ("before",)},
    "replace_seq2sup": {w: SUP_WORDS for w in SEQ_WORDS},
    "replace_sup2seq": {w: SEQ_WORDS for w in SUP_WORDS},
}
INVERT_SETS: dict[str, tuple[str, ...]] = {
    "invert_bat": BAT_WORDS,
    "invert_seq": SEQ_WORDS,
    "invert_sup": SUP_WORDS,
}
SETS: tuple[str, ...] = tuple(REPLACE_SETS) + tuple(INVERT_SETS)
"""Every set, in the order of the paper's Table 5."""
TABLE5_LABELS = {
    "replace_bat": ("Replace", "BAT"),
    "replace_seq2sup": ("Replace", "seq2sup"),
    "replace_sup2seq": ("Replace", "sup2seq"),
    "invert_bat": ("Invert", "BAT"),
    "invert_seq": ("Invert", "seq"),
    "invert_sup": ("Invert", "sup"),
}


@dataclass(frozen=True)
class Relation:
    """One occurrence of a relation phrase: words[start:end] == phrase.split()."""

    start: int
    end: int
    phrase: str


@dataclass(frozen=True)
class Perturbation:
    """One perturbed caption."""

    set: str
    """One of SETS."""
    original: str
    """The normalised original caption."""
    perturbed: str
    """The perturbed caption (normalised words)."""
    relation: str
    """The relation phrase that was replaced or inverted around."""
    replacement: str
    """The new phrase (replace), or the relation itself (invert)."""
    position: int
    """Word index of the relation in the original."""


# --------------------------------------------------------------------------------------
# Pure text functions
# --------------------------------------------------------------------------------------


def find_relations(words: Sequence[str], phrases: Iterable[str] = RELATIONS) -> list[Relation]:
    """Non-overlapping occurrences of `phrases` in `words`, left to right, longest first."""
    cands = sorted({tuple(p.split()) for p in phrases}, key=len, reverse=True)
    found, i, n = [], 0, len(words)
    while i < n:
        for p in cands:
            if tuple(words[i : i + len(p)]) == p:
                found.append(Relation(i, i + len(p), " ".join(p)))
                i += len(p)
                break
        else:
            i += 1
    return found


def perturb_caption(
    text: str,
    sets: Iterable[str] = SETS,
    alternatives: str = "all",
    rng: random.Random | None = None,
) -> list[Perturbation]:
    """Every perturbation of one caption for the given sets (see the module docstring).

    `text` is normalised first. alternatives="random" needs `rng`.
    """
    sets = list(sets)
    unknown = [s for s in sets if s not in SETS]
    if unknown:
        raise ValueError(f"unknown perturbation set(s) {unknown}; known: {list(SETS)}")
    if alternatives not in ("all", "random"):
        raise ValueError(f"alternatives must be 'all' or 'random', got {alternatives!r}")
    if alternatives == "random" and rng is None:
        raise ValueError("alternatives='random' needs an rng")
    w = normalized_words(text)
    original = " ".join(w)
    rels = find_relations(w)  # every relation: phrases as units, proposition bounds
    out: list[Perturbation] = []

    def add(set_name: str, new_words: list[str], rel: Relation, repl: str) -> None:
        perturbed = " ".join(new_words)
        if perturbed != original:
            out.append(Perturbation(set_name, original, perturbed, rel.phrase, repl, rel.start))

    for s in sets:
        if s in REPLACE_SETS:
            table = REPLACE_SETS[s]
            for rel in rels:
                alts = table.get(rel.phrase)
                if not alts:
                    continue
                chosen = alts if alternatives == "all" else (rng.choice(alts),)
                for alt in chosen:
                    add(s, w[: rel.start] + alt.split() + w[rel.end :], rel, alt)
        else:
            targets = INVERT_SETS[s]
            for k, rel in enumerate(rels):
                if rel.phrase not in targets:
                    continue
                lo = rels[k - 1].end if k > 0 else 0
                hi = rels[k + 1].start if k + 1 < len(rels) else len(w)
                left, right = w[lo : rel.start], w[rel.end : hi]
                if not left or not right:
                    continue
                add(s, w[:lo] + right + w[rel.start : rel.end] + left + w[hi:], rel, rel.phrase)
    return out


def caption_rng(seed: int, caption_id: str) -> random.Random:
    """The rng of one caption's random draws: independent of the other captions."""
    return random.Random(f"{seed}:{caption_id}")


def build_perturbations(
    caption_ids: Sequence[str],
    texts: Sequence[str],
    audio_ids: Sequence[str],
    sets: Iterable[str] = SETS,
    alternatives: str = "all",
    seed: int = 0,
) -> list[tuple[str, str, Perturbation]]:
    """(caption_id, audio_id, perturbation) for every caption, in caption order."""
    sets = list(sets)
    rows = []
    for cid, text, aid in zip(caption_ids, texts, audio_ids, strict=True):
        rng = caption_rng(seed, cid) if alternatives == "random" else None
        for p in perturb_caption(text, sets, alternatives, rng):
            rows.append((cid, aid, p))
    return rows


def accuracy_table(pairs: pa.Table, sets: Iterable[str] = SETS) -> dict:
    """Per set: counts and accuracies from a pair table.

    Needs columns set, caption_id, loss_original, loss_perturbed, oov_original,
    oov_perturbed. A pair counts as correct when loss_perturbed > loss_original (strictly).
    In-vocabulary pairs: neither caption holds an out-of-vocabulary word. Accuracies are
    None where there is no pair.
    """
    col = {c: pairs.column(c).to_numpy(zero_copy_only=False) for c in (
        "set", "caption_id", "loss_original", "loss_perturbed", "oov_original", "oov_perturbed"
    )}
    out = {}
    for s in sets:
        m = col["set"] == s
        higher = col["loss_perturbed"][m] > col["loss_original"][m]
        oov_p = col["oov_perturbed"][m] > 0
        in_vocab = (col["oov_original"][m] == 0) & ~oov_p
        n, n_iv = int(m.sum()), int(in_vocab.sum())
        out[s] = {
            "accuracy": float(higher.mean()) if n else None,
            "n_perturbed": n,
            "n_higher": int(higher.sum()),
            "n_captions": len(set(col["caption_id"][m].tolist())),
            "n_perturbed_with_oov": int(oov_p.sum()),
            "accuracy_in_vocab": float(higher[in_vocab].mean()) if n_iv else None,
            "n_in_vocab": n_iv,
            "n_higher_in_vocab": int(higher[in_vocab].sum()),
        }
    return out


def format_table(metrics: dict) -> str:
    """A table like the paper's Table 5, with the in-vocabulary accuracies and counts."""

    def f(v):
        return "  -  " if v is None else f"{v:.3f}"

    sets = metrics["sets"]
    lines = [
        f"Perturbation accuracy: share of perturbed captions whose loss on the caption's own audio "
        f"is higher (0.5 is chance); audio_pos_enc={metrics['audio_pos_enc']}",
        f"{'Type':8} {'Set':8} {'Accuracy':>8} {'In-vocab':>8} {'Pairs':>7} {'w/ OOV':>7} {'Captions':>8}",
    ]
    last_type = None
    for s in SETS:
        if s not in sets:
            continue
        r = sets[s]
        typ, name = TABLE5_LABELS[s]
        lines.append(
            f"{typ if typ != last_type else '':8} {name:8} {f(r['accuracy']):>8} {f(r['accuracy_in_vocab']):>8} "
            f"{r['n_perturbed']:>7} {r['n_perturbed_with_oov']:>7} {r['n_captions']:>8}"
        )
        last_type = typ
    lines.append(
        "In-vocab: pairs whose captions hold no out-of-vocabulary word (an <unk> raises a loss "
        "whatever the audio)."
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# The Ray Data actor
# --------------------------------------------------------------------------------------


class PerturbActor:
    """Rows of (audio_id, tokens) -> their teacher-forced losses on the caption's audio."""

    def __init__(self, cfg_dict: dict):
        cfg = from_dict(PerturbConfig, cfg_dict)
        device, model, tok, _ = stage.actor_setup(cfg.actors, cfg.checkpoint, cfg.task)
        audio = read_embeddings(cfg.audio, cfg.audio_subsets)
        self.pos = audio.index()
        self.scorer = PairScorer(model, tok.pad_id, audio.frames, device, cfg.scorer.precision, cfg.scorer.pairs_per_batch)

    def __call__(self, batch: dict) -> dict:
        idx = [self.pos[str(a)] for a in batch["audio_id"]]
        tokens = [list(map(int, t)) for t in batch["tokens"]]
        return {"pair_id": np.asarray(batch["pair_id"], dtype=np.int64), "loss": self.scorer.loss_pairs(idx, tokens)}


# --------------------------------------------------------------------------------------
# The job: plan, set up, run, reduce, commit
# --------------------------------------------------------------------------------------

MEMORY_WAYS_OUT = (
    "fewer audios (audio_subsets); scorer.precision=bf16 (half the key/value cache); fewer "
    "actors per node (a larger actors.num_cpus each); a larger actors.memory_gb (or null: the "
    "node's memory); a GPU with more memory (actors.num_gpus); on a GPU a smaller "
    "scorer.pairs_per_batch (the `forward` part grows with it)"
)


@dataclass
class PairPlan:
    """The perturbed captions kept and the unique (audio, tokens) pairs that score them."""

    kept: list[tuple[str, str, Perturbation]]
    """(caption_id, audio_id, perturbation), in caption order."""
    original_pair: list[int]
    """Per kept row: its original caption's pair (an index into `pairs`)."""
    perturbed_pair: list[int]
    pairs: list[tuple[str, tuple[int, ...]]]
    """The unique (audio_id, token ids) to score: a caption shared by several rows is scored once."""
    n_identical: int
    """Perturbations dropped: their tokens equal the original's once cut to the decoder's length."""


@dataclass
class PerturbPlan:
    """What the driver checked and decided before any actor starts."""

    n_captions: int
    n_without_audio: int
    """Captions with no audio_id: no own audio, skipped."""
    pairs: PairPlan
    tok: WordTokenizer
    audio_pos_enc: bool
    checkpoint: dict
    actor_memory: dict[str, int]
    """Bytes one actor holds, by part (`scorer.scorer_memory`)."""


def plan_pairs(rows: list[tuple[str, str, Perturbation]], tok: WordTokenizer, max_tokens: int) -> PairPlan:
    """Every (caption_id, audio_id, perturbation) row -> its two pairs, each unique (audio,
    tokens) once; a row whose two captions tokenise alike is dropped and counted."""
    pair_of: dict[tuple[str, tuple[int, ...]], int] = {}
    plan = PairPlan([], [], [], [], 0)

    def pair_id(aid: str, text: str) -> int:
        key = (aid, tuple(tokenize(tok, [text], max_tokens)[0]))
        if key not in pair_of:
            pair_of[key] = len(plan.pairs)
            plan.pairs.append(key)
        return pair_of[key]

    for cid, aid, p in rows:
        a, b = pair_id(aid, p.original), pair_id(aid, p.perturbed)
        if a == b:  # the change fell past the decoder's length
            plan.n_identical += 1
            continue
        plan.kept.append((cid, aid, p))
        plan.original_pair.append(a)
        plan.perturbed_pair.append(b)
    return plan


def actor_memory(cfg: PerturbConfig, audio: EmbeddingSet, model: CaptionDecoder, pairs: PairPlan) -> dict[str, int]:
    """What a PerturbActor holds: a PairScorer over every audio, one batch of pairs at a time."""
    return scorer_memory(
        len(audio.audio_ids), max(f.shape[0] for f in audio.frames), model.cfg,
        sum(p.numel() for p in model.parameters()), cfg.scorer.precision, 0,
        vocab_size=model.classifier.out_features, max_tokens=max((len(t) for _, t in pairs.pairs), default=2),
        pairs_per_batch=cfg.scorer.pairs_per_batch, gpu=cfg.actors.num_gpus > 0,
    )  # block 0: a perturb batch holds pair losses (B floats), not an N x block matrix


def plan_perturb(cfg: PerturbConfig) -> PerturbPlan:
    """Inputs checked (score_matrix's checks), perturbations built, pairs deduplicated;
    raises BadInputError naming the bad items before anything runs."""
    model, tok, info = ckpt_lib.load(cfg.checkpoint, task=cfg.task)
    audio = read_embeddings(cfg.audio, cfg.audio_subsets)
    cids, texts, gts, bad = check_inputs(
        audio,
        f"{cfg.audio} (subsets {cfg.audio_subsets})",
        read_captions(cfg.captions, cfg.caption_subsets),
        f"{cfg.captions} (subsets {cfg.caption_subsets})",
    )
    if bad:
        raise BadInputError("perturb refused its inputs, nothing was scored:\n  " + "\n  ".join(bad))
    keep = [i for i, a in enumerate(gts) if a is not None]
    n_no_audio = len(cids) - len(keep)
    if n_no_audio:
        log.warning("perturb: %d caption(s) have no audio_id (no own audio) and are skipped", n_no_audio)
    rows = build_perturbations(
        [cids[i] for i in keep], [texts[i] or "" for i in keep], [gts[i] for i in keep],
        cfg.sets, cfg.alternatives, cfg.seed,
    )
    pairs = plan_pairs(rows, tok, model.cfg.max_tokens)
    log.info(
        "perturb: %d captions with an audio, %d perturbed captions, %d pairs to score",
        len(keep), len(pairs.kept), len(pairs.pairs),
    )
    return PerturbPlan(
        len(cids), n_no_audio, pairs, tok, bool(model.cfg.audio_pos_enc), info, actor_memory(cfg, audio, model, pairs)
    )


def score_pairs(cfg: PerturbConfig, pairs: list[tuple[str, tuple[int, ...]]]) -> tuple[np.ndarray, float]:
    """Losses (P,) float32 of the unique pairs, scored on the actor pool; and the seconds."""
    import ray.data  # here only: the pure parts of this module import no Ray

    # rows sorted by audio then length: a batch pads little
    order = sorted(range(len(pairs)), key=lambda j: (pairs[j][0], len(pairs[j][1]), j))
    ds = ray.data.from_items(
        [{"pair_id": j, "audio_id": pairs[j][0], "tokens": np.array(pairs[j][1], dtype=np.int32)} for j in order],
        override_num_blocks=max(1, min(len(order), cfg.actors.num_actors * 4)),
    )
    ds = stage.map_actors(ds, PerturbActor, {"cfg_dict": to_dict(cfg)}, cfg.actors)
    losses = np.full(len(pairs), np.nan, dtype=np.float32)
    t0 = time.time()
    for row in ds.iter_rows():
        losses[int(row["pair_id"])] = row["loss"]
    seconds = time.time() - t0
    if np.isnan(losses).any():
        raise RuntimeError(f"{int(np.isnan(losses).sum())} of {len(losses)} pairs came back unscored")
    return losses, seconds


def pair_table(plan: PerturbPlan, losses: np.ndarray) -> pa.Table:
    """One row per kept perturbation: both captions, both losses, OOV counts, `higher`."""
    kept, tok = plan.pairs.kept, plan.tok
    pairs = pa.table(
        {
            "caption_id": pa.array([r[0] for r in kept], pa.string()),
            "audio_id": pa.array([r[1] for r in kept], pa.string()),
            "set": pa.array([r[2].set for r in kept], pa.string()),
            "relation": pa.array([r[2].relation for r in kept], pa.string()),
            "replacement": pa.array([r[2].replacement for r in kept], pa.string()),
            "original": pa.array([r[2].original for r in kept], pa.string()),
            "perturbed": pa.array([r[2].perturbed for r in kept], pa.string()),
            "loss_original": pa.array(losses[plan.pairs.original_pair] if kept else [], pa.float32()),
            "loss_perturbed": pa.array(losses[plan.pairs.perturbed_pair] if kept else [], pa.float32()),
            "oov_original": pa.array([tok.oov_count(r[2].original) for r in kept], pa.int32()),
            "oov_perturbed": pa.array([tok.oov_count(r[2].perturbed) for r in kept], pa.int32()),
        }
    )
    return pairs.append_column(
        "higher", pa.array(pairs.column("loss_perturbed").to_numpy() > pairs.column("loss_original").to_numpy(), pa.bool_())
    )


def perturb_metrics(cfg: PerturbConfig, plan: PerturbPlan, pairs: pa.Table, seconds: float) -> dict:
    """metrics.json: accuracies per set, what they mean, and the counts behind them."""
    kept = plan.pairs.kept
    return {
        "sets": accuracy_table(pairs, cfg.sets),
        "audio_pos_enc": plan.audio_pos_enc,
        "definitions": {
            "accuracy": "share of perturbed captions whose loss on the caption's own audio is "
            "strictly higher than the original caption's",
            "in_vocab": "pairs where neither caption holds a word outside the vocabulary",
            "n_perturbed_with_oov": "perturbed captions holding at least one out-of-vocabulary word",
        },
        "alternatives": cfg.alternatives,
        "seed": cfg.seed if cfg.alternatives == "random" else None,
        "n_captions": plan.n_captions,
        "n_captions_without_audio": plan.n_without_audio,
        "n_captions_perturbed": len({r[0] for r in kept}),
        "n_perturbed": len(kept),
        "n_dropped_identical_after_truncation": plan.pairs.n_identical,
        "n_pairs_scored": len(plan.pairs.pairs),
        "score_seconds": round(seconds, 2),
        "checkpoint": plan.checkpoint,
    }


def run_perturb(cfg: PerturbConfig) -> dict:
    t_start = time.time()
    plan = plan_perturb(cfg)  # nothing runs on inputs that fail their checks
    to_score = plan.pairs.pairs
    if to_score:  # no pair, no actor: neither Ray nor the memory guard is needed
        stage.start_ray("perturb", cfg.ray, cfg.actors)  # before the old output is invalidated
        stage.check_actor_memory("perturb", plan.actor_memory, cfg.actors, MEMORY_WAYS_OUT)
    out = stage.Output(cfg.output, "perturb", ["pairs"]).begin(cfg)
    losses, seconds = score_pairs(cfg, to_score) if to_score else (np.full(0, np.nan, np.float32), 0.0)
    pairs = pair_table(plan, losses)
    out.table("pairs", pairs)
    metrics = perturb_metrics(cfg, plan, pairs, seconds)
    out.json("metrics.json", metrics)
    out.commit({"metrics": "metrics.json"})
    print(format_table(metrics), flush=True)
    return {
        "output": cfg.output,
        "audio_pos_enc": plan.audio_pos_enc,
        "n_perturbed": len(plan.pairs.kept),
        "accuracy": {s: v["accuracy"] for s, v in metrics["sets"].items()},
        "accuracy_in_vocab": {s: v["accuracy_in_vocab"] for s, v in metrics["sets"].items()},
        "wall_seconds": round(time.time() - t_start, 1),
    }
