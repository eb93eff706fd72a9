"""A scoring-only forward of `CaptionDecoder`: one caption against many audios, no waste.

`pair_loss_memory` runs the whole `nn.TransformerDecoder` for every pair. When one
caption meets a chunk of audios most of that work is shared:
- per audio, once for every caption: the frame projection (the scorer's memory) and,
  in every layer, the cross-attention keys and values of the memory (`audio_kv`);
- per caption, once for every audio: the token embedding, the first layer's causal
  self-attention and its norm, and the first layer's cross-attention queries
  (`caption_prefix`); nothing before the first cross-attention sees the audio;
- per pair: the rest (first cross-attention onwards), on the caption's real tokens only
  (no padding: every forward is one caption).
So a pair costs the per-pair FLOPs of `pair_flops` plus a share of the per-audio and
per-caption work that vanishes as M and N grow.

The maths is `nn.TransformerDecoderLayer`'s (post-norm, GELU, eval: no dropout) on the
module's own weights, checked against the module in tests/test_fastscore.py. Attention
is written out (matmul, additive -inf mask, softmax): at T ~ 12 queries and S ~ 31 keys
it beats `F.scaled_dot_product_attention` on CPU (docs/benchmarks.md).

Precision: `compute_dtype` float32 is plain fp32 throughout. bfloat16 runs every matmul
on bf16 copies of the weights, while the residual stream, the layer norms, the softmaxes
and the log-sum-exp stay fp32; the loss is reduced in fp32.

Shapes: A audios of a chunk, S frames, T input tokens of the caption, D width, H heads,
d = D / H, F feed-forward width, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from aacray.decoder import CaptionDecoder


@dataclass
class _Layer:
    sa_w: Tensor  # (3D, D) packed q, k, v of the self-attention
    sa_b: Tensor
    sa_ow: Tensor  # (D, D)
    sa_ob: Tensor
    ca_qw: Tensor  # (D, D) cross-attention query
    ca_qb: Tensor
    ca_kvw: Tensor  # (2D, D) cross-attention key, value (applied to the memory, per audio)
    ca_kvb: Tensor
    ca_ow: Tensor
    ca_ob: Tensor
    w1: Tensor  # (F, D)
    b1: Tensor
    w2: Tensor  # (D, F)
    b2: Tensor
    norms: list  # [(weight, bias, eps)] x 3, fp32


class FastDecoder:
    """Per-pair losses of one caption against chunks of audios (see the module docstring)."""

    def __init__(self, model: CaptionDecoder, compute_dtype: torch.dtype = torch.float32):
        assert not model.training, "FastDecoder needs model.eval()"
        assert compute_dtype in (torch.float32, torch.bfloat16), f"{compute_dtype=}"
        cfg = model.cfg
        self.D, self.H = cfg.d_model, cfg.n_heads
        self.dh = self.D // self.H
        self.dtype = compute_dtype
        self.model = model
        D, dt = self.D, compute_dtype

        def c(t: Tensor) -> Tensor:
            return t.detach().to(dt).contiguous()

        self.layers: list[_Layer] = []
        for lay in model.transformer.layers:
            sa, ca = lay.self_attn, lay.multihead_attn
            assert sa._qkv_same_embed_dim and ca._qkv_same_embed_dim, "packed q/k/v weights expected"
            assert not lay.norm_first, "post-norm layers expected"
            assert lay.activation is F.gelu or getattr(lay, "activation_relu_or_gelu", 0) == 2, (
                "GELU layers expected"
            )
            self.layers.append(
                _Layer(
                    sa_w=c(sa.in_proj_weight),
                    sa_b=c(sa.in_proj_bias),
                    sa_ow=c(sa.out_proj.weight),
                    sa_ob=c(sa.out_proj.bias),
                    ca_qw=c(ca.in_proj_weight[:D]),
                    ca_qb=c(ca.in_proj_bias[:D]),
                    ca_kvw=c(ca.in_proj_weight[D:]),
                    ca_kvb=c(ca.in_proj_bias[D:]),
                    ca_ow=c(ca.out_proj.weight),
                    ca_ob=c(ca.out_proj.bias),
                    w1=c(lay.linear1.weight),
                    b1=c(lay.linear1.bias),
                    w2=c(lay.linear2.weight),
                    b2=c(lay.linear2.bias),
                    norms=[
                        (n.weight.detach().float(), n.bias.detach().float(), n.eps)
                        for n in (lay.norm1, lay.norm2, lay.norm3)
                    ],
                )
            )
        self.cls_w = c(model.classifier.weight)  # (V, D)
        self.cls_b = c(model.classifier.bias)
        self.scale = 1.0 / math.sqrt(self.dh)

    # --- per audio ---------------------------------------------------------------------
    def audio_kv(self, memory: Tensor) -> list[tuple[Tensor, Tensor]]:
        """memory (A, S, D) -> per layer (K, V), each (A, H, S, d) in the compute dtype."""
        A, S, D = memory.shape
        x = memory.to(self.dtype).reshape(A * S, D)
        out = []
        for L in self.layers:
            kv = F.linear(x, L.ca_kvw, L.ca_kvb).view(A, S, 2, self.H, self.dh)
            out.append(
                (
                    kv[:, :, 0].transpose(1, 2).contiguous(),
                    kv[:, :, 1].transpose(1, 2).contiguous(),
                )
            )
        return out

    # --- per caption -------------------------------------------------------------------
    def caption_prefix(self, tokens_in: Tensor) -> tuple[Tensor, Tensor]:
        """tokens_in (T,) long -> (x (T, D) fp32 after the first norm, q (H, T, d) scaled)."""
        assert tokens_in.ndim == 1, f"{tokens_in.shape=}"
        x = self.model.embed_tokens(tokens_in[None])[0].float()  # (T, D)
        L = self.layers[0]
        x = self._self_attn(x[None], L)[0]
        q = self._q(x, L)  # (T, H, d)
        return x, q.transpose(0, 1)

    # --- per pair ----------------------------------------------------------------------
    def losses(
        self,
        prefix: tuple[Tensor, Tensor],
        kv: list[tuple[Tensor, Tensor]],
        mask: Tensor | None,
        target: Tensor,
    ) -> Tensor:
        """Losses (A,) fp32 of one caption against A audios.

        prefix: `caption_prefix` of the caption's input tokens; kv: `audio_kv` of the A
        audios' memory (each (A, H, S, d)); mask (A, S) bool, True on padded frames, or
        None; target (T,) long, the caption's target tokens (words + eos).
        """
        x1, q1 = prefix
        T, D = x1.shape
        A = kv[0][0].shape[0]
        add_mask = None
        if mask is not None and bool(mask.any()):
            add_mask = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device)
            add_mask.masked_fill_(mask, float("-inf"))
            add_mask = add_mask[:, None, None, :]  # (A, 1, 1, S)
        # first layer: the self-attention is the caption's, shared by every audio
        L = self.layers[0]
        ctx = self._attend(q1[None], *kv[0], add_mask)  # (A, T, D)
        x = self._norm(x1[None] + self._lin(ctx, L.ca_ow, L.ca_ob), L.norms[1])
        x = self._norm(x + self._ff(x, L), L.norms[2])
        for i, L in enumerate(self.layers[1:], start=1):
            x = self._self_attn(x, L)
            q = self._q(x, L).transpose(1, 2)  # (A, H, T, d)
            ctx = self._attend(q, *kv[i], add_mask)
            x = self._norm(x + self._lin(ctx, L.ca_ow, L.ca_ob), L.norms[1])
            x = self._norm(x + self._ff(x, L), L.norms[2])
        logits = self._lin(x, self.cls_w, self.cls_b).float()  # (A, T, V)
        tgt = logits.gather(2, target.view(1, T, 1).expand(A, T, 1))[..., 0]
        nll = torch.logsumexp(logits, dim=2) - tgt  # (A, T)
        return nll.sum(dim=1) / T

    # --- pieces ------------------------------------------------------------------------
    def _lin(self, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return F.linear(x.to(self.dtype), w, b)

    def _norm(self, x: Tensor, n) -> Tensor:
        return F.layer_norm(x.float(), (self.D,), n[0], n[1], n[2])

    def _q(self, x: Tensor, L: _Layer) -> Tensor:
        """(..., T, D) -> cross-attention queries (..., T, H, d), pre-scaled by 1/sqrt(d)."""
        q = self._lin(x, L.ca_qw, L.ca_qb) * self.scale
        return q.view(*x.shape[:-1], self.H, self.dh)

    def _self_attn(self, x: Tensor, L: _Layer) -> Tensor:
        """x (B, T, D) fp32 -> norm1(x + causal self-attention(x)) fp32."""
        B, T, D = x.shape
        qkv = self._lin(x, L.sa_w, L.sa_b).view(B, T, 3, self.H, self.dh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]  # (B, H, T, d)
        s = torch.matmul(q, k.transpose(-1, -2))  # (B, H, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        s = s.float().masked_fill_(causal, float("-inf"))
        p = torch.softmax(s, dim=-1).to(self.dtype)
        ctx = torch.matmul(p, v).transpose(1, 2).reshape(B, T, D)
        return self._norm(x + self._lin(ctx, L.sa_ow, L.sa_ob), L.norms[0])

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, add_mask: Tensor | None) -> Tensor:
        """q (A or 1, H, T, d), k/v (A, H, S, d) -> context (A, T, D)."""
        s = torch.matmul(q, k.transpose(-1, -2))  # (A, H, T, S)
        if add_mask is not None:
            s = s + add_mask
        p = torch.softmax(s.float(), dim=-1).to(self.dtype)
        ctx = torch.matmul(p, v)  # (A, H, T, d)
        A, _, T, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(A, T, self.D)

    def _ff(self, x: Tensor, L: _Layer) -> Tensor:
        return F.linear(F.gelu(self._lin(x, L.w1, L.b1)), L.w2, L.b2)


def pair_flops(cfg, vocab_size: int, n_tokens: float, n_frames: float) -> dict[str, float]:
    """Multiply-add FLOPs (2 per MAC) of one pair's forward on its real tokens.

    T = n_tokens input positions (= target tokens: words + eos), S = n_frames, D, F, V,
    E = cfg.emb_dim, n = cfg.n_layers. Attention scores count the full T x T / T x S
    products (what is computed; causality is a mask):
      projection   2 S E D
      self-attn    n (2 T D 3D + 2 T T D + 2 T T D + 2 T D D)   q/k/v, scores, mix, out
      cross-attn   n (2 T D D + 2 S D 2D + 2 T S D + 2 T S D + 2 T D D)
                                          q, k/v of the memory, scores, mix, out
      feed-forward n (2 T D F + 2 T F D)
      classifier   2 T D V
    `total` is the model's FLOPs per pair (what a per-pair forward needs). `per_audio`
    (projection and memory k/v) and `per_caption` (the first layer's self-attention and
    cross-attention query) are what the fast path computes once per audio / caption;
    `per_pair` = total - per_audio - per_caption is what it computes for every pair.
    """
    T, S = float(n_tokens), float(n_frames)
    D, Fw, V, E, n = cfg.d_model, cfg.d_ff, vocab_size, cfg.emb_dim, cfg.n_layers
    proj = 2 * S * E * D
    sa_one = 2 * T * D * 3 * D + 4 * T * T * D + 2 * T * D * D
    ca_q = 2 * T * D * D
    ca_kv = 2 * S * D * 2 * D
    ca_one = ca_q + ca_kv + 4 * T * S * D + 2 * T * D * D
    ff = n * 4 * T * D * Fw
    cls = 2 * T * D * V
    total = proj + n * sa_one + n * ca_one + ff + cls
    per_audio = proj + n * ca_kv
    per_caption = sa_one + ca_q
    return {
        "projection": proj,
        "self_attn": n * sa_one,
        "cross_attn": n * ca_one,
        "feed_forward": ff,
        "classifier": cls,
        "total": total,
        "per_audio": per_audio,
        "per_caption": per_caption,
        "per_pair": total - per_audio - per_caption,
    }
