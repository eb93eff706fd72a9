"""The authors' released captioner, CoNeTTE, read into aacray's modules: a model folder as the
Hugging Face hub ships it (`Labbeti/conette`), local or s3://. Nothing is downloaded here.

Layout (what conette 0.3.2's `CoNeTTEModel.save_pretrained` writes through transformers):
  config.json        `CoNeTTEConfig`: decoder sizes (d_model, nhead, num_decoder_layers,
                     dim_feedforward, decoder_dropout_p, acti_name, proj_name), decoding
                     (beam_size, min_pred_size, max_pred_size), task_mode, task_names, and
                     the vocabulary as `tokenizer_state` (`AACTokenizer.get_txt_state()`)
  model.safetensors  and/or pytorch_model.bin: `CoNeTTEModel.state_dict()`, read from the
                     first present in that order; safetensors by `safetensors`, the .bin by
                     `torch.load(weights_only=True)`, so a file that needs pickled code is
                     refused before any of it runs.

Every key of the weights is either mapped, checked or ignored, by name; anything else, a
missing tensor or a shape that does not fit is a `CheckpointError` naming the key.
Mapped (`_DECODER_PREFIXES`, `_ENCODER_PREFIX`):
  model.projection.2.*        -> CaptionDecoder projection.1.*  (conette's Sequential is
                                 Dropout, Identity, Linear, ReLU, Transpose, Dropout)
  model.decoder.emb_layer.*   -> word_emb.*
  model.decoder.layers.{i}.*  -> transformer.layers.{i}.*  (both nn.TransformerDecoderLayer,
                                 post-norm; conette's runs sequence-first: same weights)
  model.decoder.classifier.*  -> classifier.*
  preprocessor.encoder.*      -> ConvNeXtTinyAudio (aacray/encoder.py), same names except
                                 stages.{i}.{j}.scale_layer -> gamma (`load_encoder_weights`)
Checked, not loaded (`CHECKED`): what aacray derives itself must equal the folder's.
  model.decoder.pos_encoding.pos_embedding  the (5000, 1, D) sinusoid: equal to
                                 `sinusoidal_encoding` over the decoder's positions
  model.task_id_to_token_id   the ids of `<bos_{task}>` in task_names order
  model.forbid_rep_mask       (V,) True for tokens that may not repeat: the tokens it lets
                                 repeat become the tokenizer's stopwords, so beam search
                                 uses the folder's mask, whatever NLTK list conette had
Ignored (`IGNORED`): `_extra_state_`, the module's non-tensor state (the tokenizer object)
pickled into uint8 bytes; never unpickled: the vocabulary comes from config.json.

Task tokens: CoNeTTE starts every caption with `<bos_{task}>` (task_mode ds_src / ds). The
tokenizer is loaded for one task and uses its token as bos, so scoring (words and eos are
the targets, not the task token: conette's masking), captioning and perturbation run the
same code as with aacray's own checkpoints. A task token missing from the vocabulary is
appended at the next id, in task order, as conette's `build_model` does.

Sizes come from config.json; emb_dim from proj_name (lin768 -> 768, lin2048 -> 2048);
proj_dropout is build_proj_lin's 0.5 (dropout is off in eval); max_len MAX_LEN positions.
The tokenizer must be conette's default (word level, lowercase, punctuation removed,
normalised): aacray's normaliser version 2 reproduces exactly that one.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from aacray import storage
from aacray.decoder import CaptionDecoder, DecoderConfig, sinusoidal_encoding
from aacray.errors import CheckpointError
from aacray.text import SPECIAL_TOKENS, WordTokenizer

CONFIG = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
DEFAULT_TASK = "clotho"
MAX_LEN = 64
FETCH = "hf download Labbeti/conette --local-dir conette"

_DECODER_PREFIXES = (
    ("model.projection.2.", "projection.1."),
    ("model.decoder.emb_layer.", "word_emb."),
    ("model.decoder.layers.", "transformer.layers."),
    ("model.decoder.classifier.", "classifier."),
)
_ENCODER_PREFIX = "preprocessor.encoder."
POS_KEY = "model.decoder.pos_encoding.pos_embedding"
TASK_IDS_KEY = "model.task_id_to_token_id"
REPEAT_KEY = "model.forbid_rep_mask"
CHECKED = {
    POS_KEY: "the fixed sinusoid: checked equal to aacray's, which aacray computes itself",
    TASK_IDS_KEY: "task -> token id: checked equal to the ids of <bos_{task}> in config.json's vocabulary",
    REPEAT_KEY: "tokens that may not repeat: the tokens it lets repeat are the tokenizer's stopwords",
}
IGNORED = {
    "_extra_state_": "pickled non-tensor state (the tokenizer object): never unpickled; "
    "the vocabulary comes from config.json's tokenizer_state",
}
_PROJ_DIMS = {"lin768": 768, "lin2048": 2048}
_TOKENIZER_HPARAMS = {"level": "word", "lowercase": True, "punctuation_mode": "remove", "normalize": True}


@dataclass
class Folder:
    """A CoNeTTE folder read and split by name; tensors keep the folder's key names."""

    uri: str
    config: dict
    weights: str  # the weights file read
    sha256: str  # of that file
    decoder: dict[str, Tensor]
    encoder: dict[str, Tensor]
    checked: dict[str, Tensor]


def is_folder(uri: str) -> bool:
    """True for a folder holding config.json and a CoNeTTE weights file."""
    return storage.exists(storage.join(uri, CONFIG)) and any(
        storage.exists(storage.join(uri, name)) for name in WEIGHT_FILES
    )


def read_weights(path: str) -> tuple[dict[str, Tensor], str]:
    """A safetensors or torch weights file -> ({name: tensor}, the file's sha256), never
    running pickled code."""
    data = storage.read_bytes(path)
    return _tensors(path, data), hashlib.sha256(data).hexdigest()


def _tensors(path: str, data: bytes) -> dict[str, Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        try:
            return load_safetensors(data)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as e:
        raise CheckpointError(
            f"{path}: refused: only plain tensors are loaded (torch.load(weights_only=True)) and this "
            f"file holds pickled code or objects ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            f"Fetch the folder again from the hub ({FETCH}), or convert a file you trust to safetensors"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict (expected {{name: tensor}}, got {type(state).__name__})")
    return state


def read_folder(uri: str) -> Folder:
    """config.json and the weights of a CoNeTTE folder, every key sorted into its part."""
    try:
        config = storage.read_json(storage.join(uri, CONFIG))
    except ValueError as e:
        raise CheckpointError(f"{storage.join(uri, CONFIG)}: not valid JSON ({e})") from None
    name = next((n for n in WEIGHT_FILES if storage.exists(storage.join(uri, n))), None)
    if name is None:
        raise CheckpointError(
            f"{uri}: a config.json but none of {', '.join(WEIGHT_FILES)}: copy the whole folder ({FETCH})"
        )
    path = storage.join(uri, name)
    tensors, sha = read_weights(path)
    parts: dict[str, dict[str, Tensor]] = {"decoder": {}, "encoder": {}, "checked": {}}
    unknown = []
    for key, value in tensors.items():
        if key in IGNORED:
            continue
        part = "checked" if key in CHECKED else _part_of(key)
        if part is None:
            unknown.append(key)
        else:
            parts[part][key] = value
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} key(s) that aacray neither maps nor knows to ignore, e.g. "
            f"{sorted(unknown)[:5]}: not a CoNeTTE model aacray can read (conette 0.3.2's layout)"
        )
    return Folder(uri, config, name, sha, **parts)


def _part_of(key: str) -> str | None:
    if key.startswith(_ENCODER_PREFIX):
        return "encoder"
    if any(key.startswith(src) for src, _ in _DECODER_PREFIXES):
        return "decoder"
    return None


def decoder_key(key: str) -> str:
    """A CoNeTTE decoder key -> aacray's CaptionDecoder key."""
    return next(dst + key[len(src) :] for src, dst in _DECODER_PREFIXES if key.startswith(src))


def decoder_source(key: str) -> str:
    """aacray's CaptionDecoder key -> the CoNeTTE key it is read from."""
    return next((src + key[len(dst) :] for src, dst in _DECODER_PREFIXES if key.startswith(dst)), key)


def encoder_key(key: str) -> str:
    """A CoNeTTE encoder key -> aacray's ConvNeXtTinyAudio key (scale_layer is gamma)."""
    key = key[len(_ENCODER_PREFIX) :]
    return key[: -len("scale_layer")] + "gamma" if key.endswith(".scale_layer") else key


def encoder_source(key: str) -> str:
    """aacray's ConvNeXtTinyAudio key -> the CoNeTTE key it is read from."""
    return _ENCODER_PREFIX + (key[: -len("gamma")] + "scale_layer" if key.endswith(".gamma") else key)


def load_strict(module: nn.Module, tensors: dict[str, Tensor], rename: Callable[[str], str],
                source: Callable[[str], str], where: str) -> None:
    """Load `tensors` (folder names) into `module` through `rename`; a key the module lacks,
    a tensor it lacks or a shape that differs is an error naming the folder's key."""
    want = module.state_dict()
    got = {rename(k): v for k, v in tensors.items()}
    extra = sorted(k for k, dst in zip(tensors, got, strict=True) if dst not in want)
    missing = sorted(source(k) for k in want if k not in got)
    shapes = [
        f"{source(k)} {tuple(v.shape)} (the model needs {tuple(want[k].shape)})"
        for k, v in got.items() if k in want and v.shape != want[k].shape
    ]
    problems = [
        f"{label}: {items[:5]}{' ...' if len(items) > 5 else ''}"
        for label, items in (("keys the model has no place for", extra), ("missing tensors", missing),
                             ("wrong shapes", shapes)) if items
    ]
    if problems:
        raise CheckpointError(
            f"{where}: the weights do not fit the model its config.json describes; "
            + "; ".join(problems) + ". The folder is damaged or is not CoNeTTE's: fetch it again"
        )
    module.load_state_dict(got, strict=True)


def _get(config: dict, key: str, path: str):
    if key not in config:
        raise CheckpointError(f"{path}: no {key!r}: not a CoNeTTE config.json (conette's CoNeTTEConfig writes it)")
    return config[key]


def decoder_config(folder: Folder) -> DecoderConfig:
    """The decoder's sizes from config.json."""
    path, c = storage.join(folder.uri, CONFIG), folder.config
    proj = _get(c, "proj_name", path)
    if proj not in _PROJ_DIMS:
        raise CheckpointError(f"{path}: proj_name {proj!r} is none of {sorted(_PROJ_DIMS)}, the projections aacray has")
    if _get(c, "acti_name", path) != "gelu":
        raise CheckpointError(f"{path}: acti_name {c['acti_name']!r}: aacray's decoder layers use gelu")
    try:
        return DecoderConfig(
            emb_dim=_PROJ_DIMS[proj], d_model=_get(c, "d_model", path), n_layers=_get(c, "num_decoder_layers", path),
            n_heads=_get(c, "nhead", path), d_ff=_get(c, "dim_feedforward", path),
            dropout=_get(c, "decoder_dropout_p", path), proj_dropout=0.5, max_len=MAX_LEN,
        )
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def task_names(folder: Folder) -> list[str]:
    return [str(t) for t in _get(folder.config, "task_names", storage.join(folder.uri, CONFIG))]


def vocabulary(folder: Folder) -> dict[str, int]:
    """token -> id from tokenizer_state, task tokens included (appended as conette does)."""
    path = storage.join(folder.uri, CONFIG)
    state = _get(folder.config, "tokenizer_state", path)
    if not isinstance(state, dict) or "tokenizer" not in state:
        raise CheckpointError(f"{path}: tokenizer_state holds no vocabulary (conette builds an untrained tokenizer)")
    tok = state["tokenizer"]
    hp = {k: tok.get("hparams", {}).get(k) for k in _TOKENIZER_HPARAMS}
    if hp != _TOKENIZER_HPARAMS or tok.get("hparams", {}).get("backend", "spacy") != "spacy":
        raise CheckpointError(
            f"{path}: its tokenizer is {tok.get('hparams')}; aacray reproduces conette's default only "
            f"({_TOKENIZER_HPARAMS}, spaCy words)"
        )
    stoi = {str(w): int(i) for w, i in tok["stoi"].items()}
    if sorted(stoi.values()) != list(range(len(stoi))) or any(stoi.get(t) != i for i, t in enumerate(SPECIAL_TOKENS)):
        raise CheckpointError(f"{path}: tokenizer_state's ids are not 0..V-1 with {SPECIAL_TOKENS} first")
    for task in task_names(folder):
        stoi.setdefault(f"<bos_{task}>", len(stoi))
    return stoi


def start_token(folder: Folder, task: str) -> str:
    """The token captions of `task` start with; an unknown task is refused naming the choices."""
    tasks = task_names(folder)
    if task not in tasks:
        raise CheckpointError(
            f"task {task!r} is not one of this model's tasks {tasks} ({storage.join(folder.uri, CONFIG)}): "
            "set task= to one of them"
        )
    mode = folder.config.get("task_mode", "ds_src")
    if mode == "none":
        return SPECIAL_TOKENS[1]
    if mode in ("ds", "ds_src"):
        return f"<bos_{task}>"
    raise CheckpointError(f"{storage.join(folder.uri, CONFIG)}: task_mode {mode!r} is none of none, ds, ds_src")


def _checked(folder: Folder, key: str, shape: tuple[int, ...] | None = None) -> Tensor:
    where = storage.join(folder.uri, folder.weights)
    if key not in folder.checked:
        raise CheckpointError(f"{where}: missing tensor {key} ({CHECKED[key]})")
    value = folder.checked[key]
    if shape is not None and tuple(value.shape) != shape:
        raise CheckpointError(f"{where}: {key} has shape {tuple(value.shape)}, the model needs {shape}")
    return value


def stopwords_and_checks(folder: Folder, model: CaptionDecoder, stoi: dict[str, int]) -> frozenset[str]:
    """Check the tensors aacray derives itself (`CHECKED`); the words the folder's
    forbid_rep_mask lets repeat (the tokenizer's stopwords)."""
    where = storage.join(folder.uri, folder.weights)
    pe = _checked(folder, POS_KEY)
    n, D = model.cfg.max_len, model.cfg.d_model
    if pe.ndim != 3 or pe.shape[0] < n or pe.shape[1:] != (1, D):
        raise CheckpointError(f"{where}: {POS_KEY} has shape {tuple(pe.shape)}, expected (>= {n}, 1, {D})")
    if not torch.allclose(pe[:n, 0].float(), sinusoidal_encoding(n, D), rtol=0, atol=1e-6):
        raise CheckpointError(f"{where}: {POS_KEY} is not the sinusoid aacray's decoder adds (a learnt encoding?)")
    tasks = task_names(folder)
    ids = _checked(folder, TASK_IDS_KEY, (len(tasks),))
    if folder.config.get("task_mode", "ds_src") != "none":
        want = [stoi[f"<bos_{t}>"] for t in tasks]
        if ids.tolist() != want:
            raise CheckpointError(f"{where}: {TASK_IDS_KEY} is {ids.tolist()}, config.json's vocabulary gives {want}")
    mask = _checked(folder, REPEAT_KEY, (len(stoi),)).bool()
    itos = {i: w for w, i in stoi.items()}
    return frozenset(itos[i] for i in (~mask).nonzero().flatten().tolist())


def load(uri: str, task: str = DEFAULT_TASK) -> tuple[CaptionDecoder, WordTokenizer, dict]:
    """(projection + decoder in eval mode on CPU, tokenizer for `task`, info) of a CoNeTTE
    folder. info: task, weights file and sha256, the folder's decoding settings."""
    folder = read_folder(uri)
    cfg = decoder_config(folder)
    stoi = vocabulary(folder)
    start = start_token(folder, task)
    model = CaptionDecoder(cfg, len(stoi), pad_id=0)
    load_strict(model, folder.decoder, decoder_key, decoder_source, storage.join(uri, folder.weights))
    stopwords = stopwords_and_checks(folder, model, stoi)
    tok = WordTokenizer.from_vocab(stoi, bos=start, normalizer_version=2, stopwords=stopwords)
    c = folder.config
    decoding = {"beam_size": c.get("beam_size", 3), "min_len": c.get("min_pred_size", 3), "max_len": c.get("max_pred_size", 20)}
    info = {"kind": "conette", "task": task, "weights": folder.weights, "weights_sha256": folder.sha256, "decoding": decoding}
    return model.eval(), tok, info


def load_encoder_weights(model: nn.Module, uri: str) -> str:
    """Load a CoNeTTE folder's ConvNeXt (preprocessor.encoder.*) into aacray's
    ConvNeXtTinyAudio `model`, strictly; returns the weights file's sha256."""
    folder = read_folder(uri)
    load_strict(model, folder.encoder, encoder_key, encoder_source, storage.join(uri, folder.weights))
    return folder.sha256
