"""Scoring audio x caption pairs in process (no Ray): the decoder's per-pair loss, fast.

Shapes, the one legend (STYLE.md's letters; scoring.py and retrieval.py use it too):
N audios of the index, M captions (m of one block), P listed pairs; in a forward, B pairs
(the batch: B audios against one caption or against B captions), S audio frames, T
tokens, D model width, H heads, d = D / H, V vocabulary, n_layers decoder layers.

The public ways in, one per job shape:
- `BlockScorer.losses`: a block of m captions x every audio of the index, (N, m), at any
  precision (score_matrix, reindex);
- `PairScorer.loss_pairs`: a list of P (audio, caption) pairs, (P,) (perturb; and the
  fp32 re-scoring of bf16-refined);
- `PairScorer.loss_matrix`: the (N, m) matrix of one precision, what `BlockScorer` runs.
Around them: `FastDecoder` (a scoring-only forward of `CaptionDecoder` that does shared
work once), `refine_block` (bf16 screening, fp32 deciding every list: "bf16-refined"),
`tokenize` / `over_long` / `check_inputs` (the scorer's inputs), `scorer_memory` (what an
actor holds), `reference_loss_matrix` (the plain per-pair loop the tests compare against).
score_matrix, perturb and reindex (the Ray stages) all score through this module.

FastDecoder. `pair_loss_memory` runs the whole `nn.TransformerDecoder` for every pair. When
a caption meets many audios most of that work is shared (the decoder is post-norm, so
nothing before a layer's cross-attention sees the audio):
- per audio, once for every caption: the frame projection (the scorer's memory) and the
  cross-attention keys and values of every layer (`audio_kv`);
- per caption, once for every audio: the token embedding, the first layer's causal
  self-attention and norm, and the first layer's cross-attention queries (`prefix`);
- per pair: everything from the first cross-attention on, over the caption's real tokens.
`pair_flops` counts the three parts.

The maths is `nn.TransformerDecoderLayer`'s (post-norm, GELU, eval: no dropout) on the
module's own weights, checked against the module in tests/test_fastscore.py. On CPU the
attention is written out (matmul, additive -inf mask, softmax in fp32): with ~12 queries
and ~31 keys per head it runs within noise of `F.scaled_dot_product_attention` in fp32 and
faster in bf16 (docs/benchmarks.md); on CUDA the fused kernel is used.

Precision (`compute_dtype`); no path uses autocast:
- float32: fp32 throughout.
- bfloat16: the decoder layers' matmuls (attention included, keys/values cached in bf16)
  run in bf16 on bf16 copies of the weights, and so does the classifier, on target-shifted
  logits (`FastDecoder._shifted_nll`: a trained model's logits are large, and rounding
  them to bf16 made most of a plain bf16 classifier's error); the residual stream, the
  layer norms, the log-softmax and the loss stay fp32. The attention's softmax runs in
  fp32 (faster than a bf16 softmax on CPU). On the demo model the largest |loss - fp32| /
  fp32 is 3.0-3.4e-3 (2.0-2.2e-3 with an fp32 classifier, which costs 1.2-1.45x the time at
  V = 5000 on an AMX Xeon and ~1.04x on an AVX-512 EPYC; docs/benchmarks.md).
- bf16-refined's screening pass (`SCREENING`): bf16 as above, with the residual stream and
  the layer norms in bf16 too, where the refinement margin covers the error.

Linear layers on CPU use oneDNN with weights pre-packed for the scorer's row count
(`torch.ops.mkldnn`, what `torch.compile` uses for CPU linears) when that op exists, and
`F.linear` otherwise: same maths, ~10% faster here (docs/benchmarks.md).

Memory: a scorer keeps, for all N audios, the projected index (N x S x D fp32) and every
layer's cross-attention keys/values (2 x n_layers x N x S x D in the compute dtype: 38 GB
fp32 for 100k audios of 31 frames at the paper's size); bf16-refined keeps two scorers
(bf16 and fp32); and one forward's activations (`forward_memory`: on a GPU, where a forward
takes every pairs_per_batch pair at once, mostly the logits). `scorer_memory` adds it up;
score_matrix, perturb and reindex check it before any actor starts, on a GPU each part
against the memory that holds it (`memory_places`: the frames as read and a block's losses
stay in host memory).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor

from aacray import machine
from aacray.decoder import CaptionDecoder, DecoderConfig, pair_loss
from aacray.embeddings import check_embeddings, duplicate_ids
from aacray.retrieval import minmax_scale
from aacray.text import WordTokenizer

log = logging.getLogger("aacray.scorer")


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

    def __call__(self, x: Tensor, gelu: bool = False, residual: Tensor | None = None) -> Tensor:
        """x W^T + b (GELU'd when asked), plus residual when given: fused into the oneDNN
        call when it has the output's dtype and shape (the same fp32 roundings as a
        separate add), a separate add otherwise."""
        x = x.to(self.dtype)
        if self.packed is None:
            y = F.linear(x, self.w, self.b)
            y = F.gelu(y) if gelu else y
            return y if residual is None else residual + y
        shape = x.shape
        out_shape = (*shape[:-1], self.w.shape[0])
        x2 = x.reshape(-1, shape[-1])
        if residual is not None and not gelu and residual.dtype == self.dtype and residual.shape == out_shape:
            return self.op.binary(x2, residual.reshape(x2.shape[0], -1), self.packed, self.b, "add").view(out_shape)
        y = self.op(x2, self.packed, self.b, "gelu" if gelu else "none", [None], "none" if gelu else "").view(out_shape)
        return y if residual is None else residual + y


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

    x: Tensor  # (Bc, T, D) in the stream dtype, after the first layer's self-attention and norm1
    q: Tensor  # (Bc, H, T, d) that layer's cross-attention queries, scaled by 1/sqrt(d)
    # Bc: 1 (one caption shared by the forward's B audios) or B (one caption per pair)


class FastDecoder:
    """Per-pair losses from cached per-audio keys/values and per-caption prefixes.

    pack_rows: the row count oneDNN pre-packs the CPU linears' weights for (None: plain
    `F.linear`); fused_attention: `F.scaled_dot_product_attention` (True) or the written-out
    attention (False), None for fused on CUDA only. stream_dtype: the residual stream's and
    the layer norms' dtype; classifier_dtype: the classifier's (bf16: on target-shifted
    logits, `_shifted_nll`). PairScorer gives bf16 classifiers at precision bf16 and a bf16
    stream only to bf16-refined's screening pass (`SCREENING`).
    classifier_rows: the classifier and log-softmax run on this many token rows at a time
    (None: all the forward's rows at once); the default, `CLASSIFIER_ROWS`, on CPU only.
    """

    # On CPU the (rows, V) fp32 logits of one forward (15 MB at 768 rows, 61 MB at 3072, V =
    # 5000) are written by the classifier and read back by the log-softmax from memory; in
    # 128-row slices (2.5 MB) the log-softmax reads them from cache: classifier plus loss 1.5x
    # (fp32) to 2.8x (bf16, 3072 rows) faster on an AMX Xeon, the same bits (docs/benchmarks.md).
    # Slicing the feed-forward block the same way is slower (its matmuls lose more than the
    # cache gains). A GPU takes the whole forward at once.
    CLASSIFIER_ROWS = 128
    # The bf16 classifier's inputs get one extra column (the row's shift, _shifted_nll),
    # zero-padded to this many so that K stays a multiple of AMX's 32-wide bf16 tiles.
    SHIFT_PAD = 32

    def __init__(
        self,
        model: CaptionDecoder,
        compute_dtype: torch.dtype = torch.float32,
        pack_rows: int | None = 3072,
        fused_attention: bool | None = None,
        stream_dtype: torch.dtype = torch.float32,
        classifier_dtype: torch.dtype = torch.float32,
        classifier_rows: int | None | str = "auto",
    ):
        assert not model.training, "FastDecoder needs model.eval() (dropout would randomise the score)"
        for dt in (compute_dtype, stream_dtype, classifier_dtype):
            assert dt in (torch.float32, torch.bfloat16), f"{dt=}"
        cfg = model.cfg
        self.model = model
        self.D, self.H = cfg.d_model, cfg.n_heads
        self.d = self.D // self.H
        self.scale = 1.0 / math.sqrt(self.d)
        self.dtype = compute_dtype
        self.stream_dtype = stream_dtype
        self.device = model.classifier.weight.device
        self.fused_attention = self.device.type == "cuda" if fused_attention is None else fused_attention
        D, dt = self.D, compute_dtype

        def lin(w: Tensor, b: Tensor) -> _Linear:
            return _Linear(w, b, dt, pack_rows)

        # the queries' 1/sqrt(d) folded into their weights (exact when d is a power of 4)
        q_scale = torch.cat([torch.full((D,), self.scale), torch.ones(2 * D)]).to(self.device)
        self.layers: list[_Layer] = []
        for layer in model.transformer.layers:
            sa, ca = layer.self_attn, layer.multihead_attn
            assert sa._qkv_same_embed_dim and ca._qkv_same_embed_dim, "packed q/k/v weights expected"
            assert not layer.norm_first, "post-norm layers expected"
            assert layer.activation is F.gelu, "GELU layers expected"
            self.layers.append(
                _Layer(
                    sa_in=lin(sa.in_proj_weight * q_scale[:, None], sa.in_proj_bias * q_scale),
                    sa_out=lin(sa.out_proj.weight, sa.out_proj.bias),
                    ca_q=lin(ca.in_proj_weight[:D] * self.scale, ca.in_proj_bias[:D] * self.scale),
                    ca_kv=(ca.in_proj_weight[D:].detach().to(dt), ca.in_proj_bias[D:].detach().to(dt)),
                    ca_out=lin(ca.out_proj.weight, ca.out_proj.bias),
                    ff1=lin(layer.linear1.weight, layer.linear1.bias),
                    ff2=lin(layer.linear2.weight, layer.linear2.bias),
                    norms=[
                        (n.weight.detach().to(stream_dtype), n.bias.detach().to(stream_dtype), n.eps)
                        for n in (layer.norm1, layer.norm2, layer.norm3)
                    ],
                )
            )
        if classifier_rows == "auto":
            classifier_rows = self.CLASSIFIER_ROWS if self.device.type == "cpu" else None
        assert classifier_rows is None or (isinstance(classifier_rows, int) and classifier_rows > 0), f"{classifier_rows=}"
        self.classifier_rows = classifier_rows
        cls_pack = None if pack_rows is None else (classifier_rows or pack_rows)
        w, b = model.classifier.weight.detach(), model.classifier.bias.detach()
        self.shifted = classifier_dtype == torch.bfloat16
        if self.shifted:  # see _shifted_nll: the fp32 weights give the target logit, a column of ones takes -c
            self.cls_w, self.cls_b = w.float(), b.float()
            w = torch.cat([w, w.new_ones(w.shape[0], 1), w.new_zeros(w.shape[0], self.SHIFT_PAD - 1)], dim=1)
        self.classifier = _Linear(w, b, classifier_dtype, cls_pack)

    # --- per audio ---------------------------------------------------------------------
    def audio_kv(self, memory: Tensor) -> list[tuple[Tensor, Tensor]]:
        """memory (B, S, D) -> per layer (K, V), each (B, H, S, d), contiguous."""
        assert memory.ndim == 3 and memory.shape[-1] == self.D, f"{memory.shape=}"
        B, S, _ = memory.shape
        x = memory.to(self.dtype)
        out = []
        for layer in self.layers:
            kv = F.linear(x, *layer.ca_kv).view(B, S, 2, self.H, self.d)
            out.append((kv[:, :, 0].transpose(1, 2).contiguous(), kv[:, :, 1].transpose(1, 2).contiguous()))
        return out

    # --- per caption -------------------------------------------------------------------
    def prefix(self, tokens_in: Tensor) -> Prefix:
        """tokens_in (Bc, T) long, right-padded -> the caption-only part of the forward.

        With the causal mask, right padding never reaches a real position, so no key
        padding mask is needed.
        """
        assert tokens_in.ndim == 2, f"{tokens_in.shape=}"
        x = self.model.embed_tokens(tokens_in).to(self.stream_dtype)
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
        """Per-pair losses (B,) fp32: mean over target tokens of -log p, as `pair_loss`.

        prefix: of Bc = 1 caption (shared by the B audios) or of Bc = B captions;
        kv: `audio_kv` of the B audios, each (B, H, S, d); memory_pad_mask (B, S) bool,
        True on padded frames, or None; target (Bc, T) long, pad_id marking its padding
        (None: no padding).
        """
        x1, q1 = prefix.x, prefix.q
        Bc, T, _ = x1.shape
        B = kv[0][0].shape[0]
        assert Bc in (1, B) and target.shape == (Bc, T), f"{x1.shape=} {target.shape=} {B=}"
        if memory_pad_mask is not None:
            assert memory_pad_mask.shape == (B, kv[0][0].shape[2]), f"{memory_pad_mask.shape=}"
        mask = self.memory_mask(memory_pad_mask)
        layer = self.layers[0]
        x = self._cross_and_ff(x1, q1, kv[0], mask, layer)
        for i, layer in enumerate(self.layers[1:], start=1):
            x = self._self_attn(x, layer)
            x = self._cross_and_ff(x, self._queries(x, layer), kv[i], mask, layer)
        tgt = target.expand(B, T).reshape(-1)
        ignore = -100 if pad_id is None else pad_id
        nll = self._token_nll(x.reshape(B * T, self.D), tgt, ignore).view(B, T)
        if pad_id is None:
            return nll.sum(dim=1) / T
        n = (target != pad_id).sum(dim=1)
        assert bool((n > 0).all()), "a caption has no target token (expected at least eos)"
        return nll.sum(dim=1) / n.to(torch.float32)

    # --- one position at a time (beam search, aacray/decoding.py) -----------------------
    def self_attn_cache(self, rows: int, max_len: int) -> list[tuple[Tensor, Tensor]]:
        """Per layer, the self-attention keys and values of `rows` hypotheses, each (rows, H,
        max_len, d) in the compute dtype, for `step` to fill position by position."""
        shape = (rows, self.H, max_len, self.d)
        return [(torch.zeros(shape, dtype=self.dtype, device=self.device), torch.zeros(shape, dtype=self.dtype, device=self.device))
                for _ in self.layers]

    @staticmethod
    def move_cache(cache: list[tuple[Tensor, Tensor]], dest: Tensor, src: Tensor, n: int) -> None:
        """Hypotheses reassigned (row src -> row dest): their first n positions go along."""
        for keys, values in cache:
            keys[dest, :, :n] = keys[src, :, :n]  # the right side is a copy: rows may swap
            values[dest, :, :n] = values[src, :, :n]

    def step(self, x: Tensor, t: int, rows: Tensor, cache: list, kv: list, mask: Tensor | None) -> Tensor:
        """The decoder at position t of the hypotheses `rows` -> their last hidden states (R, D).

        x (R, 1, D): their tokens at t, embedded (`CaptionDecoder.embed_tokens`); cache
        (`self_attn_cache`) holds their positions < t and gets position t here; kv (`audio_kv`)
        and mask (`memory_mask`, or None) cover every hypothesis, `rows` picks theirs. The
        maths of `losses` on one new query per layer: earlier positions are never redone.
        """
        R = x.shape[0]
        x = x.to(self.stream_dtype)
        mask = None if mask is None else mask[rows]
        for (ck, cv), (k, v), layer in zip(cache, kv, self.layers, strict=True):
            qkv = layer.sa_in(x).view(R, 3, self.H, self.d)  # the query scaled by 1/sqrt(d) already
            ck[rows, :, t] = qkv[:, 1]
            cv[rows, :, t] = qkv[:, 2]
            s = torch.matmul(qkv[:, 0, :, None], ck[rows, :, : t + 1].transpose(-1, -2))  # (R, H, 1, t + 1)
            ctx = torch.matmul(_softmax(s), cv[rows, :, : t + 1]).reshape(R, 1, self.D)
            x = self._norm(layer.sa_out(ctx, residual=x), layer.norms[0])
            x = self._cross_and_ff(x, self._queries(x, layer), (k[rows], v[rows]), mask, layer)
        return x[:, 0]

    # --- pieces ------------------------------------------------------------------------
    def memory_mask(self, memory_pad_mask: Tensor | None) -> Tensor | None:
        """(B, S) bool, True on padded frames -> the attention's additive mask (B, 1, 1, S):
        -inf there, 0 elsewhere, in the compute dtype; None stays None."""
        if memory_pad_mask is None:
            return None
        B, S = memory_pad_mask.shape
        mask = torch.zeros(B, 1, 1, S, dtype=self.dtype, device=memory_pad_mask.device)
        return mask.masked_fill_(memory_pad_mask[:, None, None, :], float("-inf"))

    def _token_nll(self, x: Tensor, target: Tensor, ignore: int) -> Tensor:
        """x (n, D) last hidden states, target (n,) -> -log p(target) (n,) fp32 (0 where
        target is ignore): the classifier, then the log-softmax and the loss in fp32, on
        classifier_rows rows at a time. Every slice has that row count, the last one
        overlapping its predecessor, so a row's bits never depend on n (a one-row matmul
        rounds differently on CPU)."""
        n, c = x.shape[0], self.classifier_rows

        def nll(rows: slice) -> Tensor:
            if self.shifted:
                return self._shifted_nll(x[rows], target[rows], ignore)
            logits = self.classifier(x[rows]).float()
            return F.cross_entropy(logits, target[rows], ignore_index=ignore, reduction="none")

        if c is None or n <= c:
            return nll(slice(None))
        out = torch.empty(n, dtype=torch.float32, device=x.device)
        for s in [*range(0, n - c + 1, c), *([n - c] if n % c else [])]:
            out[s : s + c] = nll(slice(s, s + c))
        return out

    def _shifted_nll(self, x: Tensor, target: Tensor, ignore: int) -> Tensor:
        """The bf16 classifier's -log p(target), (n,) fp32, with each row's logits shifted by
        its target logit before they are rounded to bf16.

        A bf16 linear accumulates in fp32 but rounds its output to bf16: a logit of 20 then
        carries an error of up to 0.0625 (half its bf16 spacing), most of a plain bf16
        classifier's loss error. Here the target logit c is computed first in fp32 (one dot
        product per row), and the matmul gets -bf16(c) as an extra input column against a
        weight column of ones, so it accumulates logits - bf16(c) in fp32 and rounds that:
        small where the softmax's mass is (the target and the logits near it). Then
        -log p = logsumexp(logits - bf16(c)) + bf16(c) - c, all fp32 after the matmul."""
        safe = torch.where(target == ignore, 0, target)
        c = (x.float() * self.cls_w[safe]).sum(dim=-1) + self.cls_b[safe]
        n, D = x.shape
        xa = x.new_zeros(n, D + self.SHIFT_PAD, dtype=torch.bfloat16)
        xa[:, :D] = x
        xa[:, D] = -c
        y = self.classifier(xa).float()
        nll = torch.logsumexp(y, dim=-1) - xa[:, D].float() - c
        return nll.masked_fill(target == ignore, 0.0)

    def _norm(self, x: Tensor, n) -> Tensor:
        return F.layer_norm(x, (self.D,), n[0], n[1], n[2])

    def _queries(self, x: Tensor, layer: _Layer) -> Tensor:
        """x (Bc, T, D) -> cross-attention queries (Bc, H, T, d), scaled by 1/sqrt(d)."""
        Bc, T, _ = x.shape
        return layer.ca_q(x).view(Bc, T, self.H, self.d).transpose(1, 2)

    def _self_attn(self, x: Tensor, layer: _Layer) -> Tensor:
        """x (Bc, T, D) -> norm1(x + causal self-attention(x)), in the stream dtype (Bc: 1 or B)."""
        Bc, T, D = x.shape
        qkv = layer.sa_in(x).view(Bc, T, 3, self.H, self.d).permute(2, 0, 3, 1, 4)
        if self.fused_attention:
            ctx = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True, scale=1.0)
        else:
            s = torch.matmul(qkv[0], qkv[1].transpose(-1, -2))  # (Bc, H, T, T), q scaled already
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            ctx = torch.matmul(_softmax(s.masked_fill_(causal, float("-inf"))), qkv[2])
        ctx = ctx.transpose(1, 2).reshape(Bc, T, D)
        return self._norm(layer.sa_out(ctx, residual=x), layer.norms[0])

    def _cross_and_ff(self, x: Tensor, q: Tensor, kv: tuple[Tensor, Tensor], mask: Tensor | None, layer: _Layer) -> Tensor:
        """x (Bc, T, D), q (Bc, H, T, d), kv (B, H, S, d) each -> (B, T, D) in the stream dtype:
        norm3(y + ff(y)) with y = norm2(x + cross-attention(q, kv))."""
        k, v = kv
        B, T = k.shape[0], x.shape[1]
        if self.fused_attention:
            ctx = F.scaled_dot_product_attention(q.expand(B, -1, -1, -1).contiguous(), k, v, attn_mask=mask, scale=1.0)
        else:
            s = torch.matmul(q, k.transpose(-1, -2))  # (B, H, T, S)
            if mask is not None:
                s = s + mask
            ctx = torch.matmul(_softmax(s), v)  # (B, H, T, d)
        ctx = ctx.transpose(1, 2).reshape(B, T, self.D)
        y = self._norm(layer.ca_out(ctx, residual=x), layer.norms[1])
        return self._norm(layer.ff2(layer.ff1(y, gelu=True), residual=y), layer.norms[2])


def _softmax(s: Tensor) -> Tensor:
    """Softmax over the last dim, computed in fp32 and returned in s's dtype: on CPU a bf16
    softmax is about twice as slow as converting, fp32 softmax and converting back
    (docs/benchmarks.md); for fp32 scores it is exactly `torch.softmax`."""
    return torch.softmax(s.float(), dim=-1).to(s.dtype)


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


# --------------------------------------------------------------------------------------
# The pair scorer over a fixed audio index
# --------------------------------------------------------------------------------------


@functools.cache
def _warn_if_bf16_emulated() -> None:
    """Once per process: bf16 scoring on a CPU that emulates bf16 matmul is ~100x slower."""
    name, flags = machine.cpu_info()
    if machine.bf16_emulated(flags):
        log.warning(
            "scorer.precision bf16 / bf16-refined on %s: this CPU has %s, so torch emulates "
            "bf16 at about 1%% of fp32's speed; set scorer.precision: fp32 for CPU actors here",
            name, machine.matrix_units(flags),
        )


def audios_per_forward(n_tokens: int, pairs_per_batch: int, cpu_rows: int | None) -> int:
    """Pairs in one `PairScorer` forward of captions of n_tokens tokens: pairs_per_batch,
    and on CPU (cpu_rows set) no more than cpu_rows token rows' worth, one pair at least."""
    return pairs_per_batch if cpu_rows is None else max(1, min(pairs_per_batch, cpu_rows // n_tokens))


class PairScorer:
    """Losses of a fixed audio index against tokenised captions: a matrix or listed pairs.

    Built once per actor: each audio is projected once (memory, sorted by length so that
    neighbours pad little) and, through `FastDecoder.audio_kv`, so are the cross-attention
    keys/values of every layer, kept for all N audios (2 x n_layers x N x S x D in the
    compute dtype, `scorer_memory`). A caption's caption-only work (embedding, first
    self-attention) is done once, then its pairs run against fixed chunks of the sorted
    audio index (`_chunks`): a forward is one caption, unpadded, against one chunk.

    Knobs the benchmark's ablations turn (docs/benchmarks.md; the jobs use the defaults):
    cpu_rows: on CPU a forward stops at this many token rows (chunk audios x caption
    tokens), so the activations stay cache-sized; None: pairs_per_batch audios a forward, as
    on a GPU. Outputs are bit-identical across blocks and actors for a fixed value; another
    value changes the chunks, so the last bits. pack_weights: oneDNN pre-packed CPU linears
    (False: `F.linear`, same maths, ~10% slower). fused_attention: as `FastDecoder`'s.
    stream_bf16 (precision bf16 only): the residual stream and norms in bf16 too;
    bf16-refined screens with `SCREENING` (its margin covers the error), plain bf16 keeps
    them fp32. classifier_bf16: the classifier in bf16 (target-shifted) or fp32; None: bf16
    at precision bf16. classifier_rows: as `FastDecoder`'s (the bits of
    the whole forward at the values tested: 5, 48, 128).
    """

    # CPU forwards stop at about this many token rows by default, one value for every CPU so
    # that actors on different machines give the same bits (docs/benchmarks.md: on an AMX
    # Xeon 3072 rows beat 768 by 6% at fp32 and 13% at bf16, the whole index by no more; on
    # an AVX2-only EPYC 256 to the whole index are within noise).
    CPU_ROWS = 3072

    def __init__(
        self,
        model: CaptionDecoder,
        pad_id: int,
        frames: list[np.ndarray],
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        pairs_per_batch: int = 4096,
        *,
        cpu_rows: int | None = CPU_ROWS,
        pack_weights: bool = True,
        fused_attention: bool | None = None,
        stream_bf16: bool = False,
        classifier_bf16: bool | None = None,
        classifier_rows: int | None | str = "auto",
    ):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        if (stream_bf16 or classifier_bf16) and precision != "bf16":
            raise ValueError("stream_bf16 and classifier_bf16 need precision bf16")
        if classifier_bf16 is None:
            classifier_bf16 = precision == "bf16"
        self.model = model.to(device).eval()
        self.pad_id = pad_id
        self.device = torch.device(device)
        self.precision = precision
        self.pairs_per_batch = pairs_per_batch
        if self.device.type == "cpu" and precision == "bf16":
            _warn_if_bf16_emulated()
        self._project(frames)
        on_cpu = self.device.type == "cpu"
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        pack_rows = (cpu_rows or self.CPU_ROWS) if on_cpu and pack_weights else None
        self.fast = FastDecoder(
            self.model, dtype, pack_rows=pack_rows, fused_attention=fused_attention,
            stream_dtype=torch.bfloat16 if stream_bf16 else torch.float32,
            classifier_dtype=torch.bfloat16 if classifier_bf16 else torch.float32,
            classifier_rows=classifier_rows,
        )
        self.cpu_rows = cpu_rows if on_cpu else None
        with torch.inference_mode():
            parts = [
                self.fast.audio_kv(self.memory[a0 : a0 + pairs_per_batch])
                for a0 in range(0, self.n_audios, pairs_per_batch)
            ]
            self.kv = [tuple(torch.cat([p[i][j] for p in parts]) for j in range(2)) for i in range(len(parts[0]))]
        self._chunk_cache: dict[int, list] = {}

    def _project(self, frames: list[np.ndarray]) -> None:
        """frames (N lists of (S_i, E)) -> memory (N, S, D) fp32 and mask (N, S) bool (True on
        padding), rows sorted by frame count: a chunk of neighbours pads little."""
        self.n_audios = len(frames)
        lens = np.array([f.shape[0] for f in frames])
        self.order = np.argsort(lens, kind="stable")
        self.rank_of = np.empty(len(frames), dtype=np.int64)  # frames position -> sorted position
        self.rank_of[self.order] = np.arange(len(frames))
        self.lens = lens[self.order]
        S, D = int(lens.max()), self.model.cfg.d_model
        self.memory = torch.zeros(len(frames), S, D, device=self.device)
        self.mask = torch.ones(len(frames), S, dtype=torch.bool, device=self.device)
        with torch.inference_mode():
            for j, i in enumerate(self.order):
                f = torch.tensor(np.asarray(frames[i], np.float32), device=self.device)[None]
                self.memory[j, : f.shape[1]] = self.model.encode(f)[0].float()
                self.mask[j, : f.shape[1]] = False

    def _chunks(self, T: int) -> list[tuple[int, int, int, bool]]:
        """Fixed chunks (a0, a1, S, padded) of the sorted audio index for a caption of T input
        tokens: at most pairs_per_batch audios (and cpu_rows token rows on CPU). They depend
        on T and the index only, never on the other captions scored alongside."""
        if T not in self._chunk_cache:
            size = audios_per_forward(T, self.pairs_per_batch, self.cpu_rows)
            out = []
            for a0 in range(0, self.n_audios, size):
                a1 = min(a0 + size, self.n_audios)
                S = int(self.lens[a1 - 1])
                out.append((a0, a1, S, bool(self.lens[a0] < S)))
            self._chunk_cache[T] = out
        return self._chunk_cache[T]

    def _kv(self, rows: slice | torch.Tensor, S: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k[rows, :, :S], v[rows, :, :S]) for k, v in self.kv]

    def loss_matrix(self, tokens: list[list[int]]) -> np.ndarray:
        """Token id lists of m captions ([bos .. eos]) -> losses (N, m) float32.

        Every forward is one caption (unpadded) against one fixed chunk of the length-sorted
        audio index, so a pair's loss is computed the same way, to the bit, whatever the
        caption block it arrives in and whichever actor scores it.
        """
        m = len(tokens)
        out = np.empty((self.n_audios, m), dtype=np.float32)
        with torch.inference_mode():
            for j in range(m):
                tok = torch.tensor(tokens[j], dtype=torch.long, device=self.device)[None]
                assert tok.shape[1] >= 2, f"caption {j} has no target token: {tokens[j]}"
                prefix = self.fast.prefix(tok[:, :-1])
                for a0, a1, S, padded in self._chunks(tok.shape[1] - 1):
                    mask = self.mask[a0:a1, :S] if padded else None
                    losses = self.fast.losses(prefix, self._kv(slice(a0, a1), S), mask, tok[:, 1:])
                    out[self.order[a0:a1], j] = losses.cpu().numpy()
        return out

    def loss_pairs(self, audio_index, tokens: list[list[int]], caption_index=None) -> np.ndarray:
        """Losses (P,) float32 of P listed pairs; audio_index (P,): positions in the frames
        given to the constructor. The one way to score a list of pairs; how the captions are
        named picks the layout, and with it the numerics:

        - caption_index None: tokens holds P token lists, pair p's own caption. Pairs run in
          batches of pairs_per_batch (fewer on CPU) mixing captions, right-padded: the fast
          layout for pairs that mostly have a caption of their own (perturb). Equal to
          `loss_matrix`'s losses within fp32 rounding, not to the bit.
        - caption_index (P,): tokens is a list of captions and pair p is (audio_index[p],
          tokens[caption_index[p]]). Each pair is computed as `loss_matrix` computes it (its
          caption's prefix alone, its audio padded to its fixed chunk), so the losses are
          `loss_matrix`'s: the fp32 half of "bf16-refined" (`refine_block`) relies on it.
          Pairs of one caption length in one chunk share forwards (stacked per-pair
          prefixes; rows never mix). The kernels may still round a row differently in a
          forward of another row count (a one-row forward does on this CPU, so a lone pair
          takes a neighbour along; otherwise seen once in 1,600 pairs, one ulp, for a
          width-32 model, never at the paper's width): equal to the last bit, not always in
          it. Captions with the same tokens are computed once, so duplicates tie exactly.
        """
        if caption_index is None:
            assert len(audio_index) == len(tokens), f"{len(audio_index)=} {len(tokens)=}"
            return self._pairs_batched(np.asarray(audio_index, dtype=np.int64), tokens)
        audio_index = np.asarray(audio_index, dtype=np.int64)
        caption_index = np.asarray(caption_index, dtype=np.int64)
        assert audio_index.shape == caption_index.shape, f"{audio_index.shape=} {caption_index.shape=}"
        return self._pairs_as_matrix(audio_index, tokens, caption_index)

    def _pairs_batched(self, audio_index: np.ndarray, tokens: list[list[int]]) -> np.ndarray:
        """`loss_pairs` with one caption per pair: batches sorted by audio then length."""
        P = len(tokens)
        out = np.empty(P, dtype=np.float32)
        if P == 0:
            return out
        rows = self.rank_of[audio_index]
        lengths = np.array([len(t) for t in tokens])
        p_order = np.lexsort((lengths, rows))
        size = audios_per_forward(int(lengths.max()), self.pairs_per_batch, self.cpu_rows)
        with torch.inference_mode():
            for p0 in range(0, P, size):
                idx = p_order[p0 : p0 + size]
                r = torch.as_tensor(rows[idx], device=self.device)
                S = int(self.lens[rows[idx]].max())
                T = int(lengths[idx].max())
                tok = torch.full((len(idx), T), self.pad_id, dtype=torch.long)
                for j, i in enumerate(idx):
                    tok[j, : len(tokens[i])] = torch.tensor(tokens[i])
                tok = tok.to(self.device)
                mask = self.mask[r, :S]
                prefix = self.fast.prefix(tok[:, :-1])
                losses = self.fast.losses(
                    prefix, self._kv(r, S), mask if bool(mask.any()) else None, tok[:, 1:], self.pad_id
                )
                out[idx] = losses.cpu().numpy()
        return out

    def _pairs_as_matrix(self, audio_index: np.ndarray, tokens: list[list[int]], caption_index: np.ndarray) -> np.ndarray:
        """`loss_pairs` with a caption list: pairs grouped by (caption length, chunk)."""
        if audio_index.size == 0:
            return np.empty(0, dtype=np.float32)
        # one computation per distinct (audio, token sequence)
        first: dict[tuple, int] = {}
        canon = np.array([first.setdefault(tuple(tokens[c]), int(c)) for c in caption_index.tolist()], dtype=np.int64)
        pairs, back = np.unique(np.stack([audio_index, canon], axis=1), axis=0, return_inverse=True)
        if pairs.shape[0] < audio_index.size:
            return self._pairs_as_matrix(pairs[:, 0], tokens, pairs[:, 1])[back.reshape(-1)]
        out = np.empty(audio_index.size, dtype=np.float32)
        ranks = self.rank_of[audio_index]
        T_of = np.array([len(tokens[c]) - 1 for c in caption_index], dtype=np.int64)
        chunk_of = np.empty_like(ranks)
        for T in np.unique(T_of):
            sel = T_of == T
            starts = np.array([c[0] for c in self._chunks(int(T))])
            chunk_of[sel] = np.searchsorted(starts, ranks[sel], side="right") - 1
        order = np.lexsort((caption_index, ranks, chunk_of, T_of))
        key = np.stack([T_of[order], chunk_of[order]], axis=1)
        bounds = np.flatnonzero((key[1:] != key[:-1]).any(axis=1)) + 1
        prefixes: dict[int, Prefix] = {}
        with torch.inference_mode():
            for grp in np.split(order, bounds):
                T = int(T_of[grp[0]])
                chunk = self._chunks(T)[int(chunk_of[grp[0]])]
                out[grp] = self._chunk_group(tokens, ranks[grp], caption_index[grp], T, chunk, prefixes)
        return out

    def _chunk_group(self, tokens, ranks: np.ndarray, caps: np.ndarray, T: int, chunk, prefixes: dict) -> np.ndarray:
        """Pairs of captions of T input tokens whose audios (sorted positions `ranks`) lie in
        one chunk -> their losses, in forwards of at most the chunk's row count."""
        a0, a1, S, padded = chunk
        per = a1 - a0 if self.cpu_rows is None else max(1, self.cpu_rows // T)
        out = np.empty(ranks.size, dtype=np.float32)
        for g0 in range(0, ranks.size, per):
            rows, cs = ranks[g0 : g0 + per], caps[g0 : g0 + per]
            n = rows.size
            if n == 1 and a1 - a0 > 1:  # a neighbour along (its loss is dropped): see loss_pairs
                rows = np.append(rows, rows[0] + 1 if rows[0] + 1 < a1 else rows[0] - 1)
                cs = np.append(cs, cs[0])
            ps = [self._prefix(tokens, int(c), prefixes) for c in cs]
            pre = Prefix(torch.cat([p.x for p in ps]), torch.cat([p.q for p in ps]))
            target = torch.tensor([tokens[int(c)][1:] for c in cs], dtype=torch.long, device=self.device)
            r = torch.as_tensor(rows, device=self.device)
            mask = self.mask[r, :S] if padded else None
            out[g0 : g0 + n] = self.fast.losses(pre, self._kv(r, S), mask, target).cpu().numpy()[:n]
        return out

    def _prefix(self, tokens, c: int, cache: dict) -> Prefix:
        """Caption c's prefix computed alone (as `loss_matrix` does), once per call."""
        if c not in cache:
            tok = torch.tensor(tokens[c], dtype=torch.long, device=self.device)[None]
            cache[c] = self.fast.prefix(tok[:, :-1])
        return cache[c]


# --------------------------------------------------------------------------------------
# bf16 screening, fp32 decisions ("bf16-refined")
# --------------------------------------------------------------------------------------

REFINE_MARGIN = 0.01
"""Default bound on the screening pass's loss error, relative to the loss. With `SCREENING`
the largest error measured on the demo model's 72,000 validation + evaluation pairs is
4.2e-3 (an AMX Xeon's demo run) and 4.6e-3 (an AVX-512 EPYC's): about 2.2x headroom; plain
bf16 reaches 3.0-3.4e-3 there (docs/benchmarks.md, target-shifted bf16 classifier). With
the fp32 classifier a margin of 0.005 re-scored 8.2% of 288,000 demo pairs rather than 9.0%."""
# bf16-refined's screening scorer: bf16 beyond plain bf16 where the margin covers the error.
# docs/benchmarks.md: a bf16 residual stream and norms raise the largest |bf16 - fp32| / fp32
# on those 72,000 pairs from 3.0-3.4e-3 to 4.2-4.6e-3 (under half the margin). (With a bf16
# classifier rounding the logits themselves, before `FastDecoder._shifted_nll`, the same
# screening reached 1.0e-2: at the margin.)
SCREENING = dict(stream_bf16=True)


def _window(P: np.ndarray, D: np.ndarray, k: int) -> np.ndarray:
    """Scores P (Q, C) known to within +-D (Q, C) -> bool (Q, C): per query (row), every
    candidate that could be among its k smallest true scores, i.e. whose lower bound P - D is
    at most the k-th smallest upper bound P + D of its row. The true top k of a row is inside
    (the k-th smallest true score is at most the k-th smallest upper bound), and a candidate
    outside lies strictly above every candidate of the true top k."""
    k = min(k, P.shape[1])
    if k < 1 or P.size == 0:
        return np.zeros(P.shape, dtype=bool)
    kth = np.partition(P + D, k - 1, axis=1)[:, k - 1 : k]
    return (P - D) <= kth


def refine_block(
    L: np.ndarray,
    rescore,
    k: int,
    margin: float = REFINE_MARGIN,
    stat_rows: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """bf16 losses of a block (N audios x m captions) -> the block with fp32 losses on every
    pair that decides a top-k list or a caption's min/max, so that `score_block` gives the
    lists fp32 gives (up to fp32's own last-bit rounding), while most pairs stay bf16.

    L (N, m) bf16-scored losses; rescore(rows, cols) -> fp32 losses of the pairs (rows[i],
    cols[i]) (int arrays); margin: the assumed bound on |bf16 - fp32| as a fraction of the
    loss. stat_rows: the audios the caption min/max run over (reindex's estimated min/max),
    None for all N. Two rescoring rounds:
      1. per caption: its T2A window (`_window` with k), and the windows of its min and max
         over stat_rows; then min and max are exact, and so are the min-max spans;
      2. per audio: its raw A2T window and its min-max A2T window over the block's captions
         (min-max bounds: D / span), the pairs of round 1 counting as exact (D = 0).
    A caption whose min equals its max (span 0) has undefined min-max bounds: its pairs
    count as candidates of every min-max window.

    Returns (refined L float64, info): info = {pairs, rescored, max_rel_err} where
    max_rel_err is the largest |bf16 - fp32| / |fp32| seen on the rescored pairs: the
    guarantee assumes it stays below margin everywhere.
    """
    if margin <= 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    L = np.array(L, dtype=np.float64)
    N, m = L.shape
    D = margin * np.abs(L)
    seen, n_rescored = 0.0, 0

    def fix(mask: np.ndarray) -> None:
        nonlocal seen, n_rescored
        rows, cols = np.nonzero(mask & (D > 0))
        if rows.size == 0:
            return
        exact = np.asarray(rescore(rows, cols), dtype=np.float64)
        assert exact.shape == rows.shape, f"rescore returned {exact.shape}, expected {rows.shape}"
        rel = np.abs(L[rows, cols] - exact) / np.maximum(np.abs(exact), 1e-12)
        seen = max(seen, float(rel.max()))
        n_rescored += rows.size
        L[rows, cols] = exact
        D[rows, cols] = 0.0

    rows_s = np.arange(N) if stat_rows is None else np.asarray(stat_rows, dtype=np.int64)
    Ls, Ds = L[rows_s], D[rows_s]
    t2a = _window(L.T, D.T, k).T
    lo = np.zeros_like(t2a)
    hi = np.zeros_like(t2a)
    lo[rows_s] = _window(Ls.T, Ds.T, 1).T
    hi[rows_s] = (Ls + Ds) >= (Ls - Ds).max(axis=0, keepdims=True)
    fix(t2a | lo | hi)
    mn, mx = L[rows_s].min(axis=0), L[rows_s].max(axis=0)
    span = mx - mn
    S = minmax_scale(L, mn, mx)  # D scales alike; span 0: unbounded, every pair a candidate
    with np.errstate(divide="ignore", invalid="ignore"):
        DS = np.where(span > 0, D / np.where(span > 0, span, 1.0), np.where(D > 0, np.inf, 0.0))
    fix(_window(L, D, k) | _window(S, DS, k))
    return L, {"pairs": int(N * m), "rescored": n_rescored, "max_rel_err": seen}


class BlockScorer:
    """The losses score_matrix and reindex rank, for one fixed audio index: the one way to
    score a block of captions against every audio (`losses`).

    precision "fp32" or "bf16": `PairScorer` at that precision. "bf16-refined": a bf16
    `PairScorer` screens every pair and an fp32 one re-scores the pairs that decide the
    block's top-k lists and caption min/max (`refine_block`): the rankings of fp32 at close
    to bf16's speed once the index is large (docs/benchmarks.md). It holds both scorers,
    so about 1.5 times the index and key/value memory of fp32 alone (`scorer_memory`).
    """

    def __init__(self, model, pad_id, frames, device="cpu", precision="fp32", pairs_per_batch=4096, margin=REFINE_MARGIN):
        self.refined = precision == "bf16-refined"
        self.margin = margin
        screen = SCREENING if self.refined else {}
        self.scorer = PairScorer(model, pad_id, frames, device, "bf16" if self.refined else precision, pairs_per_batch, **screen)
        self.exact = PairScorer(model, pad_id, frames, device, "fp32", pairs_per_batch) if self.refined else None

    def losses(self, tokens: list[list[int]], k: int, stat_rows=None) -> tuple[np.ndarray, dict | None]:
        """Token lists of m captions -> (losses (N, m), refine info or None): float32, or
        float64 from bf16-refined (fp32 values widened exactly where re-scored). k: the
        top-k depth the refinement must get right; stat_rows: as `refine_block`'s."""
        L = self.scorer.loss_matrix(tokens)
        if not self.refined:
            return L, None

        def rescore(rows, cols):
            return self.exact.loss_pairs(rows, tokens, cols)

        return refine_block(L, rescore, k, self.margin, stat_rows)


    def loss_pairs(self, audio_index, tokens: list[list[int]], caption_index) -> np.ndarray:
        """Listed pairs (score_matrix's candidates): `PairScorer.loss_pairs` with a caption
        list, at fp32 or bf16 (bf16-refined refines dense blocks only)."""
        if self.refined:
            raise ValueError("bf16-refined scores dense blocks only: score listed pairs at fp32 or bf16")
        return self.scorer.loss_pairs(audio_index, tokens, caption_index)


def refine_summary(margin: float, pairs: int, rescored: int, max_rel_err: float) -> dict:
    """metrics.json's "refine" entry; logs a warning when bf16's error exceeded the margin."""
    if max_rel_err > margin:
        log.warning(
            "bf16-refined: a rescored pair's bf16 loss was off by %.2e of its fp32 loss, above refine_margin "
            "%.2e: the top-k lists may differ from fp32's. Raise refine_margin (or use precision fp32).",
            max_rel_err, margin,
        )
    return {
        "margin": margin,
        "rescored_pairs": int(rescored),
        "rescored_share": round(rescored / max(pairs, 1), 5),
        "max_rel_err_seen": float(f"{max_rel_err:.3e}"),
        "within_margin": bool(max_rel_err <= margin),
    }


def reference_loss_matrix(model: CaptionDecoder, pad_id: int, frames: list[np.ndarray], tokens: list[list[int]]) -> np.ndarray:
    """The plain loop: one `pair_loss` call per (audio, caption) pair. For tests."""
    model.eval()
    out = np.empty((len(frames), len(tokens)), dtype=np.float32)
    with torch.inference_mode():
        for i, f in enumerate(frames):
            x = torch.tensor(np.asarray(f, np.float32))[None]
            for j, t in enumerate(tokens):
                out[i, j] = float(pair_loss(model, x, None, torch.tensor([t]), pad_id)[0])
    return out


# --------------------------------------------------------------------------------------
# Inputs and their checks
# --------------------------------------------------------------------------------------


def check_inputs(audio, audio_desc: str, table: pa.Table, captions_desc: str):
    """(caption ids, texts, ground-truth audio or None, problems) of a caption table against
    an audio index: bad embeddings, an empty index or caption set, duplicate caption ids,
    captions whose ground-truth audio is not in the index. Shared by score_matrix and perturb."""
    bad = [f"audio {a}: {why}" for a, why in check_embeddings(audio, "index")]
    if not audio.audio_ids:
        bad.append(f"the audio index {audio_desc} is empty")
    cids = table.column("caption_id").to_pylist()
    texts = table.column("text").to_pylist()
    gts = table.column("audio_id").to_pylist()
    if not cids:
        bad.append(f"the caption set {captions_desc} is empty")
    dups = duplicate_ids(cids)
    if dups:
        bad.append(f"duplicate caption ids: {dups[:10]}")
    index = set(audio.audio_ids)
    missing = [(c, a) for c, a in zip(cids, gts, strict=True) if a is not None and a not in index]
    if missing:
        bad.append(
            f"{len(missing)} caption(s) whose ground-truth audio is not in the index, e.g. "
            f"{missing[:5]}: add those audios to the index or select matching subsets"
        )
    return cids, texts, gts, bad


def tokenize(tok: WordTokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    """The scorer's tokenisation: bos .. eos, cut to max_tokens keeping eos. A cut caption
    is scored as another, shorter one: a job that must not do that refuses the captions
    `over_long` names first (score_matrix does)."""
    out = []
    for t in texts:
        ids = tok.encode(t)
        if len(ids) > max_tokens:
            ids = ids[: max_tokens - 1] + [tok.eos_id]
        out.append(ids)
    return out


def over_long(caption_ids: list[str], tokens: list[list[int]], max_tokens: int) -> str | None:
    """A problem line naming the captions the decoder cannot score whole, or None.

    tokens: each caption's uncut tokens (bos, words, eos: `WordTokenizer.encode`);
    max_tokens: the decoder's `DecoderConfig.max_tokens`, so a caption may hold at most
    max_tokens - 2 words."""
    long = [(c, len(t) - 2) for c, t in zip(caption_ids, tokens, strict=True) if len(t) > max_tokens]
    if not long:
        return None
    shown = ", ".join(f"{c} ({n} words)" for c, n in long[:5])
    return (
        f"{len(long)} caption(s) longer than the decoder's limit of {max_tokens - 2} words "
        f"(model.max_len = {max_tokens - 1}), e.g. {shown}: cut, each would be scored as another, "
        "shorter caption. Shorten them or leave them out (caption_subsets), or score with a "
        "checkpoint trained with a larger model.max_len"
    )


# --------------------------------------------------------------------------------------
# What a scorer holds
# --------------------------------------------------------------------------------------


def forward_memory(
    cfg: DecoderConfig, vocab_size: int, max_tokens: int, max_frames: int, precision: str, pairs_per_batch: int, gpu: bool,
) -> int:
    """Bytes one `PairScorer` forward allocates at its peak (its activations), for captions
    of at most max_tokens token ids against audios of at most max_frames frames. A forward
    holds R = B x T token rows (T = max_tokens - 1 inputs, B = `audios_per_forward`: all
    pairs_per_batch on a GPU, about `PairScorer.CPU_ROWS` rows' worth on CPU), and at most:
    - the residual stream and its neighbours, and a prefix of B captions (`loss_pairs`),
      R x D in 6 tensors of fp32;
    - listed pairs' keys and values, gathered for the forward (`loss_pairs`; `loss_matrix`
      slices them in place): 2 x n_layers x B x S x D in the compute dtype;
    - then the largest of: the feed-forward's R x d_ff output and its GELU (compute dtype);
      the attention's R x H x max(S, T) scores with their fp32 copy and softmax (12 B); the
      classifier's C x V logits with their fp32 copy and log-probabilities (10 B), C = R on
      a GPU and `FastDecoder.CLASSIFIER_ROWS` on CPU.
    bf16-refined runs one forward at a time, so its fp32 scorer's counts. A bound:
    tests/test_memory_guard.py measures every allocation of real forwards (`loss_matrix`
    and `loss_pairs`, both layouts, fp32 and bf16) and checks it holds within 2x. At the
    paper's size (V 5000, captions of 22 token ids) a GPU forward of 4096 pairs needs 6.4 GB
    fp32, 4.3 GB of it the logits; a CPU forward 0.1-0.25 GB."""
    T, S = max(1, int(max_tokens) - 1), int(max_frames)
    audios = audios_per_forward(T, pairs_per_batch, None if gpu else PairScorer.CPU_ROWS)
    rows = audios * T
    classifier_rows = rows if gpu else min(rows, FastDecoder.CLASSIFIER_ROWS)
    c = 2 if precision == "bf16" else 4  # bytes per value in the compute dtype
    stream = 6 * rows * cfg.d_model * 4
    gathered = 2 * cfg.n_layers * audios * S * cfg.d_model * c
    ff = 2 * rows * cfg.d_ff * c
    attention = 12 * rows * cfg.n_heads * max(S, T)
    logits = 10 * classifier_rows * int(vocab_size)
    return stream + gathered + max(ff, attention, logits)


def scorer_memory(
    n_audios: int, max_frames: int, cfg: DecoderConfig, n_params: int, precision: str,
    block_captions: int, embed_width: int = 768, *, vocab_size: int, max_tokens: int,
    pairs_per_batch: int, gpu: bool,
) -> dict[str, int]:
    """Bytes one actor holds to score blocks of `block_captions` captions against N audios
    of at most S = max_frames frames with a `BlockScorer` at `precision`, by part:
    - embeddings: the N x S x embed_width float32 frames read at start-up (dropped once the
      scorers are built, but held while they are built, so part of the peak);
    - model: the module's fp32 weights, plus per scorer FastDecoder's weight copies in its
      compute dtype (bf16 copies; on CPU oneDNN-packed ones), counted as two: a bound;
    - index: per scorer the projected memory N x S x D fp32 and its N x S bool padding mask;
    - kv_cache: per scorer every layer's cross-attention keys and values, 2 x n_layers x N x
      S x D in the compute dtype: at the paper's size (6 layers, D 256) 38 GB fp32 for 100k
      audios of 31 frames, the part that bounds N;
    - block: one block's losses N x block float32, the ranking's float64 working copies (3)
      and, for bf16-refined, the refinement's float64 work arrays (6);
    - forward: one forward's activations (`forward_memory`: captions of at most max_tokens
      token ids, on a GPU or on CPU), one forward at a time: blocks run one caption against
      at most min(pairs_per_batch, N) audios a forward; listed pairs (block_captions 0, as
      perturb's batches) pairs_per_batch of them.
    bf16-refined holds two scorers, a bf16 one that screens and an fp32 one that decides.
    `index` and `kv_cache` are exactly the tensors `PairScorer` allocates; the total is the
    peak, since everything above is alive while the first block is scored."""
    N, S, D, layers = int(n_audios), int(max_frames), cfg.d_model, cfg.n_layers
    scorers = {"fp32": [4], "bf16": [2], "bf16-refined": [2, 4]}[precision]  # bytes per value, per scorer
    cells = N * S
    forward_pairs = pairs_per_batch if block_captions == 0 else min(pairs_per_batch, max(N, 1))
    parts = {
        "embeddings": cells * embed_width * 4,
        "model": n_params * 4 + sum(2 * n_params * b for b in scorers),
        "index": len(scorers) * cells * (D * 4 + 1),
        "kv_cache": sum(2 * layers * cells * D * b for b in scorers),
        "block": N * block_captions * (4 + 3 * 8 + (6 * 8 if precision == "bf16-refined" else 0)),
        "forward": forward_memory(cfg, vocab_size, max_tokens, S, precision, forward_pairs, gpu),
    }
    parts["total"] = sum(parts.values())
    return parts


HOST_PARTS = ("embeddings", "block")
"""The parts of `scorer_memory` held in host memory when the scorer runs on a GPU: the frames
as read (`PairScorer._project` moves one clip at a time to the device) and a block's losses
with the ranking's and the refinement's work arrays (numpy). The rest, the model, the index,
the key/value cache and a forward's activations, are on the GPU."""


def memory_places(need: dict[str, int], gpu: bool) -> dict[str, dict[str, int]]:
    """`scorer_memory`'s (or a sum of them with the same parts) parts by the memory that holds
    them, each place with its own "total": {"host": every part} on CPU; on a GPU {"gpu": the
    model, index, key/value cache and forward, "host": `HOST_PARTS`}."""
    parts = {k: v for k, v in need.items() if k != "total"}
    places = {"host": parts} if not gpu else {"gpu": {k: v for k, v in parts.items() if k not in HOST_PARTS},
                                              "host": {k: v for k, v in parts.items() if k in HOST_PARTS}}
    return {name: {**p, "total": sum(p.values())} for name, p in places.items()}
