"""A scoring-only forward of `CaptionDecoder`: pair losses without recomputing shared work.

`pair_loss_memory` runs the whole `nn.TransformerDecoder` for every pair. When a caption
meets many audios most of that work is shared (the decoder is post-norm, so nothing
before a layer's cross-attention sees the audio):
- per audio, once for every caption: the frame projection (the scorer's memory) and the
  cross-attention keys and values of every layer (`audio_kv`);
- per caption, once for every audio: the token embedding, the first layer's causal
  self-attention and norm, and the first layer's cross-attention queries (`prefix`);
- per pair: everything from the first cross-attention on, over the caption's real tokens.
`pair_flops` counts the three parts.

The maths is `nn.TransformerDecoderLayer`'s (post-norm, GELU, eval: no dropout) on the
module's own weights, checked against the module in tests/test_fastscore.py. On CPU the
attention is written out (matmul, additive -inf mask, softmax): with ~12 queries and ~31
keys per head it runs within this machine's noise of `F.scaled_dot_product_attention`
(docs/benchmarks.md); on CUDA the fused kernel is used.

Precision (`compute_dtype`):
- float32: fp32 throughout.
- bfloat16: the decoder layers' matmuls (attention included, keys/values cached in bf16)
  run in bf16 on bf16 copies of the weights; the residual stream, the layer norms, the
  classifier, the log-softmax and the loss stay fp32. The classifier stays fp32 because a
  trained model's logits are large: rounded to bf16's 8-bit mantissa they made most of
  the error (demo checkpoint: max |loss error| 1.0e-2 with a bf16 classifier, 2.6e-3
  without), for 7-12% of the time at V = 5000 (docs/benchmarks.md).

Linear layers on CPU use oneDNN with weights pre-packed for the scorer's row count
(`torch.ops.mkldnn`, what `torch.compile` uses for CPU linears) when that op exists, and
`F.linear` otherwise: same maths, ~10% faster here (docs/benchmarks.md).

Shapes: A audios (pairs) of a forward, B = 1 (a caption shared by the A audios) or A,
S frames, T input tokens, D width, H heads, d = D / H, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from aacray.decoder import CaptionDecoder, DecoderConfig


def _mkldnn_ops():
    try:
        return torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._reorder_linear_weight
    except (AttributeError, RuntimeError):
        return None


class _Linear:
    """y = x W^T + b in the compute dtype, optionally followed by the exact (erf) GELU."""

    def __init__(self, weight: Tensor, bias: Tensor, dtype: torch.dtype, pack_rows: int | None):
        self.w = weight.detach().to(dtype).contiguous()
        self.b = bias.detach().to(dtype).contiguous()
        self.dtype = dtype
        self.packed = None
        ops = _mkldnn_ops() if pack_rows and self.w.device.type == "cpu" else None
        if ops is not None:
            try:
                self.op = ops[0]
                self.packed = ops[1](self.w, pack_rows)
            except RuntimeError:
                self.packed = None

    def __call__(self, x: Tensor, gelu: bool = False) -> Tensor:
        x = x.to(self.dtype)
        if self.packed is not None:
            shape = x.shape
            y = self.op(
                x.reshape(-1, shape[-1]), self.packed, self.b, "gelu" if gelu else "none", [None], "none" if gelu else ""
            )
            return y.view(*shape[:-1], y.shape[-1])
        y = F.linear(x, self.w, self.b)
        return F.gelu(y) if gelu else y


@dataclass
class _Layer:
    sa_in: _Linear  # packed q, k, v of the self-attention (3D, D)
    sa_out: _Linear
    ca_q: _Linear  # cross-attention query
    ca_kv: tuple[Tensor, Tensor]  # cross-attention key/value weight (2D, D) and bias, for the memory
    ca_out: _Linear
    ff1: _Linear
    ff2: _Linear
    norms: list  # [(weight, bias, eps)] x 3, fp32


@dataclass
class Prefix:
    """The caption-only part of a forward: the first layer up to its cross-attention."""

    x: Tensor  # (B, T, D) fp32, after the first layer's self-attention and norm1
    q: Tensor  # (B, H, T, d) that layer's cross-attention queries, scaled by 1/sqrt(d)


class FastDecoder:
    """Per-pair losses from cached per-audio keys/values and per-caption prefixes."""

    def __init__(self, model: CaptionDecoder, compute_dtype: torch.dtype = torch.float32, pack_rows: int | None = 768):
        assert not model.training, "FastDecoder needs model.eval() (dropout would randomise the score)"
        assert compute_dtype in (torch.float32, torch.bfloat16), f"{compute_dtype=}"
        cfg = model.cfg
        self.model = model
        self.D, self.H = cfg.d_model, cfg.n_heads
        self.d = self.D // self.H
        self.scale = 1.0 / math.sqrt(self.d)
        self.dtype = compute_dtype
        self.device = model.classifier.weight.device
        self.fused_attention = self.device.type == "cuda"
        D, dt = self.D, compute_dtype

        def lin(w: Tensor, b: Tensor) -> _Linear:
            return _Linear(w, b, dt, pack_rows)

        self.layers: list[_Layer] = []
        for layer in model.transformer.layers:
            sa, ca = layer.self_attn, layer.multihead_attn
            assert sa._qkv_same_embed_dim and ca._qkv_same_embed_dim, "packed q/k/v weights expected"
            assert not layer.norm_first, "post-norm layers expected"
            assert layer.activation is F.gelu, "GELU layers expected"
            self.layers.append(
                _Layer(
                    sa_in=lin(sa.in_proj_weight, sa.in_proj_bias),
                    sa_out=lin(sa.out_proj.weight, sa.out_proj.bias),
                    ca_q=lin(ca.in_proj_weight[:D], ca.in_proj_bias[:D]),
                    ca_kv=(ca.in_proj_weight[D:].detach().to(dt), ca.in_proj_bias[D:].detach().to(dt)),
                    ca_out=lin(ca.out_proj.weight, ca.out_proj.bias),
                    ff1=lin(layer.linear1.weight, layer.linear1.bias),
                    ff2=lin(layer.linear2.weight, layer.linear2.bias),
                    norms=[
                        (n.weight.detach().float(), n.bias.detach().float(), n.eps)
                        for n in (layer.norm1, layer.norm2, layer.norm3)
                    ],
                )
            )
        self.classifier = _Linear(model.classifier.weight, model.classifier.bias, torch.float32, pack_rows)

    # --- per audio ---------------------------------------------------------------------
    def audio_kv(self, memory: Tensor) -> list[tuple[Tensor, Tensor]]:
        """memory (A, S, D) -> per layer (K, V), each (A, H, S, d), contiguous."""
        assert memory.ndim == 3 and memory.shape[-1] == self.D, f"{memory.shape=}"
        A, S, _ = memory.shape
        x = memory.to(self.dtype)
        out = []
        for layer in self.layers:
            kv = F.linear(x, *layer.ca_kv).view(A, S, 2, self.H, self.d)
            out.append((kv[:, :, 0].transpose(1, 2).contiguous(), kv[:, :, 1].transpose(1, 2).contiguous()))
        return out

    # --- per caption -------------------------------------------------------------------
    def prefix(self, tokens_in: Tensor) -> Prefix:
        """tokens_in (B, T) long, right-padded -> the caption-only part of the forward.

        With the causal mask, right padding never reaches a real position, so no key
        padding mask is needed.
        """
        assert tokens_in.ndim == 2, f"{tokens_in.shape=}"
        x = self.model.embed_tokens(tokens_in).float()
        layer = self.layers[0]
        x = self._self_attn(x, layer)
        return Prefix(x, self._queries(x, layer))

    # --- per pair ----------------------------------------------------------------------
    def losses(
        self,
        prefix: Prefix,
        kv: list[tuple[Tensor, Tensor]],
        memory_pad_mask: Tensor | None,
        target: Tensor,
        pad_id: int | None = None,
    ) -> Tensor:
        """Per-pair losses (A,) fp32: mean over target tokens of -log p, as `pair_loss`.

        prefix: of B = 1 caption (shared by the A audios) or of B = A captions;
        kv: `audio_kv` of the A audios, each (A, H, S, d); memory_pad_mask (A, S) bool,
        True on padded frames, or None; target (B, T) long, pad_id marking its padding
        (None: no padding).
        """
        x1, q1 = prefix.x, prefix.q
        B, T, _ = x1.shape
        A = kv[0][0].shape[0]
        assert B in (1, A) and target.shape == (B, T), f"{x1.shape=} {target.shape=} {A=}"
        mask = None
        if memory_pad_mask is not None:
            assert memory_pad_mask.shape == (A, kv[0][0].shape[2]), f"{memory_pad_mask.shape=}"
            mask = torch.zeros(A, 1, 1, memory_pad_mask.shape[1], dtype=self.dtype, device=x1.device)
            mask.masked_fill_(memory_pad_mask[:, None, None, :], float("-inf"))
        layer = self.layers[0]
        x = self._cross_and_ff(x1, q1, kv[0], mask, layer)
        for i, layer in enumerate(self.layers[1:], start=1):
            x = self._self_attn(x, layer)
            x = self._cross_and_ff(x, self._queries(x, layer), kv[i], mask, layer)
        logits = self.classifier(x).float()  # (A, T, V) fp32 (a no-op unless the classifier was swapped)
        V = logits.shape[-1]
        tgt = target.expand(A, T).reshape(-1)
        ignore = -100 if pad_id is None else pad_id
        nll = F.cross_entropy(logits.view(A * T, V), tgt, ignore_index=ignore, reduction="none").view(A, T)
        if pad_id is None:
            return nll.sum(dim=1) / T
        n = (target != pad_id).sum(dim=1)
        assert bool((n > 0).all()), "a caption has no target token (expected at least eos)"
        return nll.sum(dim=1) / n.to(torch.float32)

    # --- pieces ------------------------------------------------------------------------
    def _norm(self, x: Tensor, n) -> Tensor:
        return F.layer_norm(x, (self.D,), n[0], n[1], n[2])

    def _queries(self, x: Tensor, layer: _Layer) -> Tensor:
        """x (B, T, D) -> cross-attention queries (B, H, T, d), scaled by 1/sqrt(d)."""
        B, T, _ = x.shape
        q = layer.ca_q(x) * self.scale
        return q.view(B, T, self.H, self.d).transpose(1, 2)

    def _self_attn(self, x: Tensor, layer: _Layer) -> Tensor:
        """x (B, T, D) fp32 -> norm1(x + causal self-attention(x)) fp32."""
        B, T, D = x.shape
        qkv = layer.sa_in(x).view(B, T, 3, self.H, self.d).permute(2, 0, 3, 1, 4)
        if self.fused_attention:
            ctx = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        else:
            s = torch.matmul(qkv[0] * self.scale, qkv[1].transpose(-1, -2))  # (B, H, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            ctx = torch.matmul(torch.softmax(s.masked_fill_(causal, float("-inf")), dim=-1), qkv[2])
        ctx = ctx.transpose(1, 2).reshape(B, T, D)
        return self._norm(x + layer.sa_out(ctx), layer.norms[0])

    def _cross_and_ff(self, x: Tensor, q: Tensor, kv: tuple[Tensor, Tensor], mask: Tensor | None, layer: _Layer) -> Tensor:
        """x (B, T, D) fp32, q (B, H, T, d), kv (A, H, S, d) each -> (A, T, D) fp32:
        norm3(y + ff(y)) with y = norm2(x + cross-attention(q, kv))."""
        k, v = kv
        A, T = k.shape[0], x.shape[1]
        if self.fused_attention:
            ctx = F.scaled_dot_product_attention(q.expand(A, -1, -1, -1).contiguous(), k, v, attn_mask=mask, scale=1.0)
        else:
            s = torch.matmul(q, k.transpose(-1, -2))  # (A, H, T, S)
            if mask is not None:
                s = s + mask
            ctx = torch.matmul(torch.softmax(s, dim=-1), v)  # (A, H, T, d)
        ctx = ctx.transpose(1, 2).reshape(A, T, self.D)
        y = self._norm(x + layer.ca_out(ctx), layer.norms[1])
        return self._norm(y + layer.ff2(layer.ff1(y, gelu=True)), layer.norms[2])


def pair_flops(cfg: DecoderConfig, vocab_size: int, n_tokens: float, n_frames: float) -> dict[str, float]:
    """FLOPs (2 per multiply-add) of one pair's forward on its real tokens.

    T = n_tokens input positions (= target tokens: the words + eos), S = n_frames, with D,
    F = d_ff, V, E = emb_dim and n = n_layers from the config. Attention counts the full
    T x T and T x S products (what is computed; causality is a mask):
      projection    2 S E D
      self-attn     n (2 T D 3D + 2 T T D + 2 T T D + 2 T D D)       q/k/v, scores, mix, out
      cross-attn    n (2 T D D + 2 S D 2D + 2 T S D + 2 T S D + 2 T D D)
                                                  q, memory k/v, scores, mix, out
      feed-forward  n (2 T D F + 2 T F D)
      classifier    2 T D V
    `total` is the model's FLOPs per pair (what a per-pair forward needs; norms, GELU and
    softmaxes are not counted). The fast path computes `per_audio` (projection, memory
    k/v) once per audio and `per_caption` (first layer's self-attention and query) once
    per caption; `per_pair` = total - per_audio - per_caption is what every pair costs it.
    """
    T, S = float(n_tokens), float(n_frames)
    D, Fw, V, E, n = cfg.d_model, cfg.d_ff, vocab_size, cfg.emb_dim, cfg.n_layers
    proj = 2 * S * E * D
    sa_layer = 2 * T * D * 3 * D + 4 * T * T * D + 2 * T * D * D
    ca_q, ca_kv = 2 * T * D * D, 2 * S * D * 2 * D
    ca_layer = ca_q + ca_kv + 4 * T * S * D + 2 * T * D * D
    ff = n * 4 * T * D * Fw
    cls = 2 * T * D * V
    total = proj + n * sa_layer + n * ca_layer + ff + cls
    per_audio = proj + n * ca_kv
    per_caption = sa_layer + ca_q
    return {
        "projection": proj,
        "self_attn": n * sa_layer,
        "cross_attn": n * ca_layer,
        "feed_forward": ff,
        "classifier": cls,
        "total": total,
        "per_audio": per_audio,
        "per_caption": per_caption,
        "per_pair": total - per_audio - per_caption,
    }
