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
    _pip_download("--no-binary", ":all:", f"conette=={VERSION}")


def _pip_download(*args: str) -> None:
    """`pip download --no-deps ARGS -d CACHE`, with the venv's pip or, in a venv made
    without pip (uv's), the system's python3."""
    import subprocess

    CACHE.mkdir(parents=True, exist_ok=True)
    for python in (sys.executable, "python3"):
        done = subprocess.run(
            [python, "-m", "pip", "download", "--no-deps", *args, "-d", str(CACHE)],
            check=False, capture_output=True, timeout=300,
        )
        if done.returncode == 0:
            return


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


# --- torchlibrosa: the front-end conette's ConvNeXt builds (nn/encoders/convnext.py) ----------
TORCHLIBROSA = "torchlibrosa-0.1.0-py3-none-any.whl"
TORCHLIBROSA_SHA256 = "89b65fd28b833ceb6bc74a3d0d87e2924ddc5a845d0a246b194952a4e12a38cb"


def _librosa_stand_in() -> types.ModuleType:
    """The three librosa functions torchlibrosa's Spectrogram and LogmelFilterBank call when
    they build their kernels, written from librosa's definitions (librosa itself pulls
    numba): the periodic Hann window (`get_window("hann", n, fftbins=True)`), `pad_center`,
    and `filters.mel` with librosa's defaults (Slaney mel scale, Slaney area norm, float32)."""
    import numpy as np

    def get_window(window, n, fftbins=True):
        assert window == "hann" and fftbins, (window, fftbins)
        return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)

    def pad_center(data, size):
        lpad = (size - data.shape[-1]) // 2
        return np.pad(data, (lpad, size - data.shape[-1] - lpad))

    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        lin = f / (200.0 / 3)
        return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0), lin)

    def mel_to_hz(m):
        lin = (200.0 / 3) * m
        return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), lin)

    def mel(sr, n_fft, n_mels=128, fmin=0.0, fmax=None):
        fmax = sr / 2 if fmax is None else fmax
        fft_f = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
        mel_f = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
        fdiff = np.diff(mel_f)
        ramps = np.subtract.outer(mel_f, fft_f)
        lower = -ramps[:-2] / fdiff[:-1, None]
        upper = ramps[2:] / fdiff[1:, None]
        weights = np.maximum(0, np.minimum(lower, upper))
        weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
        return weights.astype(np.float32)

    librosa = types.ModuleType("librosa")
    librosa.filters = types.SimpleNamespace(get_window=get_window, mel=mel)
    librosa.util = types.SimpleNamespace(pad_center=pad_center, exceptions=types.SimpleNamespace(ParameterError=ValueError))
    return librosa


def _torchlibrosa() -> None:
    """Import torchlibrosa 0.1.0 (conette's pin; pure Python) from its wheel in the cache,
    fetched as the sdist is, with the librosa stand-in for that import only."""
    if "torchlibrosa" in sys.modules:
        return
    wheel = CACHE / TORCHLIBROSA
    if not wheel.is_file():
        _pip_download("torchlibrosa==0.1.0")
    if not wheel.is_file():
        pytest.fail(
            f"torchlibrosa 0.1.0 (conette's front-end) not found at {wheel}; fetch it with: python3 -m pip "
            "download --no-deps torchlibrosa==0.1.0 -d ~/.cache/aacray-conette", pytrace=False,
        )
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != TORCHLIBROSA_SHA256:
        pytest.fail(f"{wheel} has sha256 {digest}, expected {TORCHLIBROSA_SHA256}")
    sys.path.insert(0, str(wheel))  # a pure-Python wheel imports as a zip
    had = sys.modules.get("librosa")
    sys.modules["librosa"] = _librosa_stand_in()
    try:
        importlib.import_module("torchlibrosa")
    finally:
        if had is None:
            sys.modules.pop("librosa", None)
        else:
            sys.modules["librosa"] = had


def load_encoder_module(name: str = "huggingface.preprocessor") -> types.ModuleType:
    """A conette module that builds the ConvNeXt (it imports torchlibrosa)."""
    _torchlibrosa()
    return load(name)


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
