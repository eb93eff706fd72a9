"""A CoNeTTE model folder built from the authors' own modules (conette 0.3.2 through
conette_ref), in the layout `CoNeTTEModel.save_pretrained` writes: random weights under
their state-dict names, config.json from their `CoNeTTEConfig`, the tokenizer fit by their
`AACTokenizer` with the task tokens their `build_model` adds. Shared by the tests that
load it (tests/test_conette_model.py and the README snippet's test)."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import conette_ref
import torch
from torch import Tensor, nn

SENTENCES = [
    "A dog barks, then a car passes.",
    "Rain falls while birds chirp",
    "The wind blows and a door slams",
    "Water runs; a man speaks loudly",
    "An engine hums softly, then a bell rings",
    "a dog barks and the rain falls in the wind",
]
TINY = dict(d_model=32, nhead=4, num_decoder_layers=2, dim_feedforward=64)


@dataclass
class Built:
    """The folder and the authors' modules it was written from."""

    folder: str
    tok: object  # their AACTokenizer (task tokens added)
    proj: nn.Module
    dec: nn.Module
    pre: nn.Module | None  # their CoNeTTEPreprocessor (the ConvNeXt), when written
    task_ids: dict[str, int]
    forbid: Tensor
    config: dict


def _modules(size: dict, seed: int, tasks_in_state: bool):
    common = conette_ref.load("pl_modules.common")
    tfmer = conette_ref.load("nn.decoders.aac_tfmer")
    tok = conette_ref.aac_tokenizer()
    tok.fit(SENTENCES)
    state_before = json.loads(json.dumps(tok.get_txt_state()))  # a copy: add_special_token mutates it
    tasks = list(conette_ref.load("huggingface.config").CoNeTTEConfig().task_names)
    task_ids = {t: tok.add_special_token(f"<bos_{t}>") for t in tasks}  # as CoNeTTEPLM.build_model
    torch.manual_seed(seed)
    proj = common.build_proj_lin(768, size["d_model"], False)
    dec = tfmer.AACTransformerDecoder(
        vocab_size=tok.get_vocab_size(), bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
        acti_name="gelu", d_model=size["d_model"], dim_feedforward=size["dim_feedforward"], dropout=0.2,
        nhead=size["nhead"], num_decoder_layers=size["num_decoder_layers"],
    )
    with torch.no_grad():  # peaked, and specials improbable, as in a trained model
        dec.classifier.weight.mul_(3.0)
        never = [tok.pad_token_id, tok.bos_token_id, tok.unk_token_id, *task_ids.values()]
        dec.classifier.bias[never] = -30.0
    forbid = common.get_forbid_rep_mask("content_words", tok, "cpu")
    return tok, (tok.get_txt_state() if tasks_in_state else state_before), tasks, task_ids, proj, dec, forbid


def _preprocessor(seed: int) -> nn.Module:
    """Their CoNeTTEPreprocessor (ConvNeXt-Tiny) with every weight random, layer scales and
    BatchNorm statistics included, so that no part of the forward is a no-op."""
    pre = conette_ref.load_encoder_module("huggingface.preprocessor").CoNeTTEPreprocessor()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pre.named_parameters():
            if name.endswith("scale_layer"):
                p.copy_(0.1 + 0.4 * torch.rand(p.shape, generator=g))
            elif ".norm" in name or "downsample_layers" in name and p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        bn = pre.encoder.bn0
        bn.running_mean.copy_(-40.0 + 5.0 * torch.randn(bn.running_mean.shape, generator=g))
        bn.running_var.copy_(100.0 * (0.5 + torch.rand(bn.running_var.shape, generator=g)))
    return pre.eval()


def conette_state_dict(root: nn.Module) -> dict[str, Tensor]:
    """What conette's `CoNeTTEModel.state_dict` returns (huggingface/model.py): the tensors,
    and the non-tensor entries pickled into one uint8 tensor `_extra_state_`."""
    states = root.state_dict()
    tensors = {k: v.contiguous() for k, v in states.items() if isinstance(v, Tensor)}
    rest = {k: v for k, v in states.items() if not isinstance(v, Tensor)}
    tensors["_extra_state_"] = torch.frombuffer(bytearray(pickle.dumps(rest)), dtype=torch.uint8)
    return tensors


def write_folder(folder: Path, config: dict, tensors: dict[str, Tensor], fmt: str = "bin") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if fmt == "bin":  # transformers 4.30's save_pretrained: torch.save of the state dict
        torch.save(tensors, folder / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(tensors, str(folder / "model.safetensors"))
    return str(folder)


def build(folder: Path, seed: int = 0, encoder: bool = False, fmt: str = "bin", size: dict | None = None,
          tasks_in_state: bool = True) -> Built:
    """Write a CoNeTTE folder; encoder=False leaves the ConvNeXt out (a decoder-only folder
    loads for scoring and captioning; the hub's folder has both)."""
    size = size or TINY
    tok, tok_state, tasks, task_ids, proj, dec, forbid = _modules(size, seed, tasks_in_state)
    root = nn.Module()
    if encoder:
        root.preprocessor = _preprocessor(seed)
    root.model = nn.Module()
    root.model.tokenizers = nn.ModuleDict({"0": tok})
    root.model.decoder = dec
    root.model.projection = proj
    root.model.register_buffer("task_id_to_token_id", torch.tensor([task_ids[t] for t in tasks]))
    root.model.register_buffer("forbid_rep_mask", forbid)
    cfg = conette_ref.load("huggingface.config").CoNeTTEConfig(**size, tokenizer_state=tok_state)
    config = {**vars(cfg), "architectures": ["CoNeTTEModel"], "transformers_version": "4.30.2"}
    config = json.loads(json.dumps(config))  # as the file holds it (tuples as lists, int keys as str)
    out = write_folder(folder, config, conette_state_dict(root), fmt)
    return Built(out, tok, proj.eval(), dec.eval(), root.preprocessor if encoder else None, task_ids, forbid, config)
