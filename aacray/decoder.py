"""Projection + transformer decoder (paper 2.1), its training augmentations (2.2), and
the teacher-forced per-pair loss that is the retrieval score (2.3).

Shape legend: B batch, S audio frames, E frame width (768), T tokens, D model width,
V vocabulary. Padding masks are bool, True on pad; sequences are right-padded.

Choices worth knowing (they follow the authors' conette code where the paper is silent):
- Word embeddings have `padding_idx=pad_id`, are scaled by sqrt(D), get a sinusoidal
  positional encoding and then dropout. Audio frames get no positional encoding unless
  `DecoderConfig.audio_pos_enc` (then the same sinusoid is added to the projected frames).
- Frames are cast to the projection's dtype, so float16 embeddings from Parquet work.
- Mixup mixes the raw frame embeddings (before the projection) and the input word
  embeddings with one lambda and one permutation per batch; targets stay unmixed.
  lambda ~ Beta(alpha, alpha), then lambda = max(lambda, 1 - lambda) (conette's
  "asymmetric" mixup), so each example stays dominant over its partner, which matters
  because its target is the unmixed one. The permutation has no fixed point.
- SpecAugment runs before mixup, on the feature axis of the raw frames.
- `pair_loss` is the retrieval score: mean over the caption's words and eos of
  -log p, in fp32, no label smoothing; padding and batch composition do not change it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class DecoderConfig:
    """Size of the projection + decoder. Defaults are the paper's CNext-trans."""

    emb_dim: int = 768
    """Width E of the precomputed frame embeddings (ConvNeXt-Tiny: 768)."""
    d_model: int = 256
    """Model width D."""
    n_layers: int = 6
    """Number of transformer decoder layers."""
    n_heads: int = 4
    """Attention heads per layer (paper 4; the authors' later configs use 8)."""
    d_ff: int = 2048
    """Feed-forward width."""
    dropout: float = 0.2
    """Dropout inside the decoder layers and after the word positional encoding."""
    proj_dropout: float = 0.5
    """Dropout before and after the frame projection Linear(E, D)."""
    max_len: int = 64
    """Most token positions the decoder accepts (bos + words + eos, input side)."""
    audio_pos_enc: bool = False
    """Add a sinusoidal positional encoding to the projected frames (off: paper-faithful)."""

    @property
    def max_tokens(self) -> int:
        """Most token ids a caption may have, bos and eos included: its max_len input
        positions (bos + words) and the last target (eos). A longer caption is refused or
        quarantined, never cut (docs/bad_inputs.md)."""
        return self.max_len + 1

    def __post_init__(self) -> None:
        for name in ("emb_dim", "d_model", "n_layers", "n_heads", "d_ff", "max_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"DecoderConfig.{name} must be a positive int, got {v!r}")
        for name in ("dropout", "proj_dropout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v < 1.0:
                raise ValueError(f"DecoderConfig.{name} must be a float in [0, 1), got {v!r}")
        if not isinstance(self.audio_pos_enc, bool):
            raise ValueError(
                f"DecoderConfig.audio_pos_enc must be a bool, got {self.audio_pos_enc!r}"
            )
        if self.d_model % 2:
            raise ValueError(
                f"DecoderConfig.d_model must be even (sinusoidal encoding), got {self.d_model}"
            )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"DecoderConfig.d_model ({self.d_model}) must be divisible by "
                f"DecoderConfig.n_heads ({self.n_heads})"
            )
        if self.max_len < 2:
            raise ValueError(f"DecoderConfig.max_len must be >= 2, got {self.max_len}")


def sinusoidal_encoding(length: int, dim: int, device=None, dtype=torch.float32) -> Tensor:
    """(length, dim) with PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(same)."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    inv = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )
    pe = torch.zeros(length, dim, device=device, dtype=torch.float32)
    pe[:, 0::2] = torch.sin(pos * inv)
    pe[:, 1::2] = torch.cos(pos * inv)
    return pe.to(dtype)


class CaptionDecoder(nn.Module):
    """Frame projection + transformer decoder + word classifier."""

    def __init__(self, cfg: DecoderConfig, vocab_size: int, pad_id: int = 0) -> None:
        super().__init__()
        if vocab_size < 1 or not 0 <= pad_id < vocab_size:
            raise ValueError(f"bad vocab_size={vocab_size} / pad_id={pad_id}")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        D = cfg.d_model
        self.projection = nn.Sequential(
            nn.Dropout(cfg.proj_dropout),
            nn.Linear(cfg.emb_dim, D),
            nn.ReLU(),
            nn.Dropout(cfg.proj_dropout),
        )
        self.word_emb = nn.Embedding(vocab_size, D, padding_idx=pad_id)
        self.emb_dropout = nn.Dropout(cfg.dropout)
        layer = nn.TransformerDecoderLayer(
            D, cfg.n_heads, cfg.d_ff, cfg.dropout, activation="gelu", batch_first=True
        )
        self.transformer = nn.TransformerDecoder(layer, cfg.n_layers)
        self.classifier = nn.Linear(D, vocab_size)
        # Not persistent: derived from the config, kept out of checkpoints.
        self.register_buffer("token_pe", sinusoidal_encoding(cfg.max_len, D), persistent=False)

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def encode(self, frames: Tensor, frame_pad_mask: Tensor | None = None) -> Tensor:
        """frames (B, S, E) -> memory (B, S, D). The pad mask is only checked here."""
        assert frames.ndim == 3 and frames.shape[-1] == self.cfg.emb_dim, f"{frames.shape=}"
        if frame_pad_mask is not None:
            assert frame_pad_mask.shape == frames.shape[:2], (
                f"{frame_pad_mask.shape=} {frames.shape=}"
            )
        w = self.projection[1].weight
        memory = self.projection(frames.to(w.dtype))
        if self.cfg.audio_pos_enc:
            memory = memory + sinusoidal_encoding(
                frames.shape[1], self.cfg.d_model, memory.device, memory.dtype
            )
        return memory

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """tokens (B, T) long -> (B, T, D): sqrt(D)-scaled embedding + positional encoding."""
        assert tokens.ndim == 2, f"{tokens.shape=}"
        T = tokens.shape[1]
        if T > self.cfg.max_len:
            raise ValueError(f"{T} token positions exceed DecoderConfig.max_len={self.cfg.max_len}")
        x = self.word_emb(tokens) * math.sqrt(self.cfg.d_model)
        return self.emb_dropout(x + self.token_pe[:T].to(x.dtype))

    def decode(
        self,
        memory: Tensor,
        memory_pad_mask: Tensor | None,
        token_emb: Tensor,
        token_pad_mask: Tensor | None = None,
    ) -> Tensor:
        """memory (B, S, D), token_emb (B, T, D) -> logits (B, T, V), causal over T."""
        assert memory.ndim == 3 and token_emb.ndim == 3, f"{memory.shape=} {token_emb.shape=}"
        assert memory.shape[0] == token_emb.shape[0], f"{memory.shape=} {token_emb.shape=}"
        if memory_pad_mask is not None:
            assert memory_pad_mask.dtype == torch.bool, f"{memory_pad_mask.dtype=}"
            # An audio with every frame masked would give NaN attention.
            assert not memory_pad_mask.all(dim=1).any(), "an audio has no unmasked frame"
        if token_pad_mask is not None:
            assert token_pad_mask.dtype == torch.bool, f"{token_pad_mask.dtype=}"
        T = token_emb.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=token_emb.device).triu(1)
        h = self.transformer(
            tgt=token_emb,
            memory=memory,
            tgt_mask=causal,
            tgt_is_causal=True,
            tgt_key_padding_mask=token_pad_mask,
            memory_key_padding_mask=memory_pad_mask,
        )
        return self.classifier(h)

    def forward(
        self,
        frames: Tensor,
        frame_pad_mask: Tensor | None,
        tokens_in: Tensor,
        token_pad_mask: Tensor | None = None,
    ) -> Tensor:
        """frames (B, S, E), tokens_in (B, T) -> logits (B, T, V).

        `token_pad_mask` defaults to tokens_in == pad_id. (With right padding and the
        causal mask it never changes the logits at real positions.)
        """
        if token_pad_mask is None:
            token_pad_mask = tokens_in == self.pad_id
        memory = self.encode(frames, frame_pad_mask)
        return self.decode(memory, frame_pad_mask, self.embed_tokens(tokens_in), token_pad_mask)


# --- augmentations ------------------------------------------------------------------------
def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def spec_augment_frames(
    frames: Tensor,
    n_stripes: int = 6,
    max_width: int = 2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Zero `n_stripes` bands of the feature axis, independently per example; a zeroed
    feature is zero in every frame. (B, S, E) -> same.

    Drawn as conette's DropStripes draws them: width uniform in [0, max_width) (exclusive,
    so the default 2 gives widths 0 or 1; max_width is first clipped to E), start uniform
    in [0, E - width) (so a stripe never reaches the last feature). Vectorised over the
    batch: the distribution is conette's, the generator's draw order is not.
    """
    assert frames.ndim == 3, f"{frames.shape=}"
    if n_stripes <= 0 or max_width <= 0 or frames.shape[2] == 0:
        return frames
    widths, starts = _stripe_draws(frames.shape[0], n_stripes, max_width, frames.shape[2], generator)
    feat = torch.arange(frames.shape[2], device=widths.device)
    mask = ((feat >= starts[..., None]) & (feat < (starts + widths)[..., None])).any(dim=1)
    return frames.masked_fill(mask.to(frames.device)[:, None, :], 0.0)  # mask (B, E)


def _stripe_draws(
    B: int, n_stripes: int, max_width: int, E: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """(widths, starts), each (B, n_stripes) long, for `spec_augment_frames`."""
    dev = _gen_device(generator)
    widths = torch.randint(0, min(max_width, E), (B, n_stripes), generator=generator, device=dev)
    u = torch.rand(B, n_stripes, generator=generator, device=dev, dtype=torch.float64)
    starts = (u * (E - widths)).long().clamp_max(E - widths - 1)
    return widths, starts


def mixup_lambda(
    alpha: float = 0.4, generator: torch.Generator | None = None, asymmetric: bool = True
) -> float:
    """lambda ~ Beta(alpha, alpha), then max(lambda, 1 - lambda) when `asymmetric`.

    Drawn with Johnk's method from the generator's uniforms (torch's Beta takes no
    generator), in log space so that small alphas do not underflow. alpha <= 0 gives 1.
    """
    if alpha <= 0:
        return 1.0
    dev = _gen_device(generator)
    while True:
        u = torch.rand(2, generator=generator, device=dev, dtype=torch.float64).tolist()
        if u[0] == 0.0 or u[1] == 0.0:
            continue
        lx, ly = math.log(u[0]) / alpha, math.log(u[1]) / alpha
        m = max(lx, ly)
        lsum = m + math.log(math.exp(lx - m) + math.exp(ly - m))
        if lsum <= 0.0:
            lam = math.exp(lx - lsum)
            return max(lam, 1.0 - lam) if asymmetric else lam


def mixup_permutation(batch_size: int, generator: torch.Generator | None = None) -> Tensor:
    """A random permutation of range(B) without fixed points (B > 1): one random cycle."""
    dev = _gen_device(generator)
    order = torch.randperm(batch_size, generator=generator, device=dev)
    perm = torch.empty_like(order)
    perm[order] = order.roll(-1)
    return perm


def mixup(x: Tensor, perm: Tensor, lam: float) -> Tensor:
    """lam * x + (1 - lam) * x[perm], along the batch axis."""
    return x * lam + x[perm.to(x.device)] * (1.0 - lam)


def mixup_pad_mask(pad_mask: Tensor | None, perm: Tensor) -> Tensor | None:
    """A mixed position is pad only if it is pad in both examples."""
    if pad_mask is None:
        return None
    return pad_mask & pad_mask[perm.to(pad_mask.device)]


def train_loss(
    model: CaptionDecoder,
    frames: Tensor,
    frame_pad_mask: Tensor | None,
    tokens: Tensor,
    *,
    label_smoothing: float = 0.2,
    mixup_alpha: float | None = 0.4,
    spec_augment: tuple[int, int] | None = (6, 2),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Training loss: SpecAugment -> mixup -> forward -> label-smoothed CE (scalar).

    tokens (B, T) = [bos w1 .. wn eos pad ..]; input tokens[:, :-1], target tokens[:, 1:].
    The CE is the mean over all non-pad target tokens of the batch. Set
    label_smoothing=0, mixup_alpha=0/None or spec_augment=None to switch a piece off.
    """
    assert frames.ndim == 3 and tokens.ndim == 2, f"{frames.shape=} {tokens.shape=}"
    assert frames.shape[0] == tokens.shape[0], f"{frames.shape=} {tokens.shape=}"
    pad = model.pad_id
    if spec_augment:
        frames = spec_augment_frames(frames, *spec_augment, generator=generator)
    tokens_in, target = tokens[:, :-1], tokens[:, 1:]
    in_pad = tokens_in == pad
    emb = model.embed_tokens(tokens_in)
    if mixup_alpha and frames.shape[0] > 1:
        lam = mixup_lambda(mixup_alpha, generator)
        perm = mixup_permutation(frames.shape[0], generator)
        frames = mixup(frames, perm, lam)
        frame_pad_mask = mixup_pad_mask(frame_pad_mask, perm)
        emb = mixup(emb, perm, lam)
        in_pad = mixup_pad_mask(in_pad, perm)
    memory = model.encode(frames, frame_pad_mask)
    logits = model.decode(memory, frame_pad_mask, emb, in_pad)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        target.reshape(-1),
        ignore_index=pad,
        label_smoothing=label_smoothing,
    )


# --- the retrieval score ------------------------------------------------------------------
def pair_loss(
    model: CaptionDecoder,
    frames: Tensor,
    frame_pad_mask: Tensor | None,
    tokens: Tensor,
    pad_id: int,
) -> Tensor:
    """Per-pair teacher-forced loss (B,) float32: the retrieval score of paper eq. 1.

    Row b is the mean over caption b's target tokens (its words and eos; not bos, not
    pad) of -log p(token | audio b, previous tokens), no label smoothing, softmax in fp32
    whatever the model's dtype. frames (B, S, E), frame_pad_mask (B, S) or None,
    tokens (B, T) = [bos w1 .. wn eos pad ..]. The model must be in eval mode (asserted);
    the caller chooses no_grad / inference_mode. A pair's loss does not depend on the
    padding (S, T) nor on the other rows of the batch.
    """
    assert frames.shape[0] == tokens.shape[0], f"{frames.shape=} {tokens.shape=}"
    return pair_loss_memory(model, model.encode(frames, frame_pad_mask), frame_pad_mask, tokens, pad_id)


def pair_loss_memory(
    model: CaptionDecoder,
    memory: Tensor,
    memory_pad_mask: Tensor | None,
    tokens: Tensor,
    pad_id: int,
) -> Tensor:
    """`pair_loss` from projected frames: memory (B, S, D) = model.encode(frames).

    The projection is per frame, so a scorer can encode each audio once and reuse its
    memory for every caption; the result is the same as `pair_loss`.
    """
    assert not model.training, "pair_loss needs model.eval() (dropout would randomise the score)"
    assert tokens.ndim == 2 and tokens.shape[1] >= 2, f"{tokens.shape=}"
    assert memory.shape[0] == tokens.shape[0], f"{memory.shape=} {tokens.shape=}"
    tokens_in, target = tokens[:, :-1], tokens[:, 1:]
    logits = model.decode(memory, memory_pad_mask, model.embed_tokens(tokens_in), tokens_in == pad_id)
    nll = F.cross_entropy(
        logits.float().transpose(1, 2), target, ignore_index=pad_id, reduction="none"
    )  # (B, T-1), 0 on pad
    n = (target != pad_id).sum(dim=1)
    assert bool((n > 0).all()), "a caption has no target token (expected at least eos)"
    return nll.sum(dim=1) / n.to(torch.float32)


# ----------------------------------------------------------------------------- batching


def pad_frames(frames: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (S_i, E) -> (B, S, E) float32 and pad mask (B, S), True on pad."""
    S = max(f.shape[0] for f in frames)
    E = frames[0].shape[1]
    x = torch.zeros(len(frames), S, E)
    mask = torch.ones(len(frames), S, dtype=torch.bool)
    for i, f in enumerate(frames):
        x[i, : f.shape[0]] = torch.tensor(np.asarray(f, dtype=np.float32))
        mask[i, : f.shape[0]] = False
    return x, mask


def pad_tokens(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    """Token id lists -> (B, T) long, right-padded with pad_id."""
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out
