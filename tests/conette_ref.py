"""The authors' own code as the reference: conette 0.3.2's modules, imported from its sdist.

conette pins torch 1.13, Lightning 1.9 and transformers 4.30, which do not fit this project,
so it is never installed. Its sdist is unpacked into a cache folder and the modules the
parity tests need are imported without `conette/__init__.py` (which pulls transformers and
Lightning): `conette` is registered as a bare package whose `__path__` is the unpacked
source, and its subpackages (empty `__init__`s) import normally. Where a module imports a
heavy package only for code no test calls, a stand-in is placed in `sys.modules` for that
import only (`pytorch_lightning.LightningModule` as `nn.Module`, `transformers.PretrainedConfig`
as a plain base, `nltk.corpus.stopwords` as aacray's packaged copy of NLTK's English list,
which nltk would otherwise have to download); none of them takes part in the maths compared.

The sdist is looked for at $AACRAY_CONETTE_SDIST, then ~/.cache/aacray-conette/, then
/tmp/conette_sdist/, and its sha256 is checked; when none is there it is downloaded (no
dependencies, nothing installed) from the package registry into the cache, as with
    python3 -m pip download --no-deps --no-binary :all: conette==0.3.2 -d ~/.cache/aacray-conette
The modules also need torchoutil==0.3.1 (its own requirements are torch and
typing_extensions) and spaCy (conette's tokenizer imports it); both are in the test extra.
Anything missing is a test failure that says what to install, not a skip.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import shutil
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import pytest

VERSION = "0.3.2"
SDIST = f"conette-{VERSION}.tar.gz"
SHA256 = "9bde1f60146d5708f3d0b59f71b086913022e452b3522e8ccbc0e2c6573bf2f9"
CACHE = Path(os.environ.get("AACRAY_CONETTE_CACHE", Path.home() / ".cache" / "aacray-conette"))
FETCH = (
    "python3 -m pip download --no-deps --no-binary :all: "
    f"conette=={VERSION} -d ~/.cache/aacray-conette"
)


def sdist_path() -> Path:
    """The conette sdist, or a pytest failure that says how to fetch it."""
    env = os.environ.get("AACRAY_CONETTE_SDIST")
    candidates = [Path(env)] if env else []
    candidates += [CACHE / SDIST, Path("/tmp/conette_sdist") / SDIST]
    if not any(p.is_file() for p in candidates):
        _fetch()
    for p in candidates:
        if p.is_file():
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            if digest != SHA256:
                pytest.fail(f"{p} has sha256 {digest}, expected conette {VERSION}'s {SHA256}")
            return p
    pytest.fail(
        f"conette {VERSION}'s sdist (the reference for the parity tests) was not found at "
        f"{', '.join(map(str, candidates))}. Fetch it with: {FETCH}",
        pytrace=False,
    )


def _fetch() -> None:
    """Download the sdist (no dependencies, nothing installed) from the package registry into
    the cache, so the README's test command needs no extra step on a fresh machine."""
    import subprocess

    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         f"conette=={VERSION}", "-d", str(CACHE)],
        check=False, capture_output=True, timeout=300,
    )


def source_root() -> Path:
    """The unpacked `src/conette` folder (unpacked once into the cache, atomically)."""
    dest = CACHE / f"conette-{VERSION}"
    pkg = dest / "src" / "conette"
    if not (pkg / "__init__.py").is_file():
        sdist = sdist_path()
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=".unpack-"))
        try:
            with tarfile.open(sdist) as tar:
                tar.extractall(tmp, filter="data")
            with contextlib.suppress(OSError):  # a concurrent unpacker may have won
                (tmp / f"conette-{VERSION}").rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not (pkg / "__init__.py").is_file():
        pytest.fail(f"unpacking {SDIST} into {dest} did not give {pkg}/__init__.py")
    return pkg


def _require(module: str, install: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError as e:
        pytest.fail(
            f"the conette reference needs {install} ({e}); install the test extra", pytrace=False
        )


def _register_package() -> None:
    root = source_root()
    have = sys.modules.get("conette")
    if have is not None:
        if list(getattr(have, "__path__", [])) != [str(root)]:
            pytest.fail(
                f"another `conette` is already imported ({have!r}); the reference needs {root}"
            )
        return
    spec = importlib.util.spec_from_file_location(
        "conette", root / "__init__.py", submodule_search_locations=[str(root)]
    )
    pkg = importlib.util.module_from_spec(spec)  # not executed: its __init__ pulls transformers
    pkg.__version__ = VERSION
    sys.modules["conette"] = pkg


def _stand_ins() -> dict[str, types.ModuleType]:
    import torch

    from aacray.text import STOPWORDS

    pl = types.ModuleType("pytorch_lightning")
    pl.LightningModule = torch.nn.Module
    tf = types.ModuleType("transformers")

    class PretrainedConfig:
        def __init__(self, **kwargs) -> None:
            self.__dict__.update(kwargs)

    tf.PretrainedConfig = PretrainedConfig
    nltk = types.ModuleType("nltk")
    corpus = types.ModuleType("nltk.corpus")
    corpus.stopwords = types.SimpleNamespace(words=lambda lang="english": sorted(STOPWORDS))
    nltk.corpus = corpus
    return {"pytorch_lightning": pl, "transformers": tf, "nltk": nltk, "nltk.corpus": corpus}


def load(name: str) -> types.ModuleType:
    """Import `conette.<name>` from the sdist (e.g. "nn.decoding.beam")."""
    _require("torchoutil", "torchoutil==0.3.1")
    _require("spacy", "spacy")
    _register_package()
    full = f"conette.{name}"
    if full in sys.modules:
        return sys.modules[full]
    stubs = {k: v for k, v in _stand_ins().items() if k not in sys.modules}
    sys.modules.update(stubs)
    try:
        return importlib.import_module(full)
    finally:
        for k in stubs:  # the stand-ins serve this import only
            sys.modules.pop(k, None)


def spacy_blank_en_path() -> Path:
    """A saved `spacy.blank("en")` pipeline: conette's tokenizer `spacy.load`s a model name,
    and a blank English pipeline has the same rule-based tokenizer as en_core_web_sm without
    a model download."""
    import spacy

    path = CACHE / f"spacy-{spacy.__version__}-blank-en"
    if not (path / "config.cfg").is_file():
        tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=".spacy-"))
        spacy.blank("en").to_disk(tmp / "nlp")
        with contextlib.suppress(OSError):
            (tmp / "nlp").rename(path)
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def aac_tokenizer():
    """conette's own AACTokenizer with its defaults (word level, spaCy, lowercase,
    punctuation "remove"), on the blank English spaCy pipeline."""
    mod = load("tokenization.aac_tokenizer")
    return mod.AACTokenizer(level="word", backend="spacy", model_name=str(spacy_blank_en_path()))
