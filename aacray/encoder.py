"""Frozen audio encoders: log-mel (B, T_frames, 224) -> frame embeddings (B, 768, S).

`ConvNeXtTinyAudio` is the AudioSet tagger of Pellegrini, Khalfaoui-Hassani, Labbé and
Masquelier (2023), the encoder of the CNext-trans captioner (paper section 2). Choices
that are not obvious from the code:

- Parameter names and shapes are the authors' (topel/audioset-convnext-inf, `ConvNeXt`
  built by `convnext_tiny(after_stem_dim=[252, 56])`), so their published state dicts
  (`convnext_tiny_471mAP.pth`, `convnext_tiny_465mAP_BL_AC_70kit.pth`, under key "model")
  load with strict key matching. That includes "gamma" for layer scale (conette renames it
  "scale_layer" on load; the checkpoints say "gamma"), the 527-class AudioSet head, and the
  frozen torchlibrosa front-end tensors (`spectrogram_extractor.stft.conv_{real,imag}.weight`,
  `logmel_extractor.melW`). We keep those as buffers, not parameters: the pipeline feeds
  log-mel computed by aacray/audio.py, and the parameter count then equals the authors'
  trainable count, 28,222,767. `waveform_to_logmel` uses them, as a reference for audio.py.
- Expected input: power mel (STFT n_fft 1024, periodic Hann 1024, hop 320, centred with
  reflect padding, |X|^2), 224 Slaney-scale bands with Slaney area normalisation,
  50-14000 Hz at 32 kHz, then 10*log10(max(mel, 1e-10)) (ref 1.0, no top_db). The
  model's own `bn0` (BatchNorm over the 224 mel bins) then normalises it.
- Stem: Conv2d(1, 96, kernel 4x4, stride 4x4, padding (4, 0)) over (time, mel): 224 mel
  bins -> 56, 1001 frames -> 252, then three stride-2 downsamplings: 31 x 7. Frame
  embeddings are the last stage's output averaged over the 7 frequency rows, before the
  final LayerNorm (as conette does), so S = (T_frames + 8) // 32: 31 for 10 s.
- Training-only parts of the authors' model (stochastic depth, SpecAugment, mixup, speed
  perturbation) are left out: the encoder is frozen and only run in eval mode.
- Checkpoints load with `weights_only=True`: a file that needs pickled code is refused.
- Without a checkpoint the encoder is randomly initialised (seeded, the authors' init
  scheme) with a loud warning: the embeddings then carry no pretrained meaning.

`LogmelPoolEncoder` is a weight-free baseline with the same output contract: log-mel
averaged over the 32-frame windows a ConvNeXt output frame is aligned with, and the 224
mel bins linearly interpolated to 768 values.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import pickle

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn

from aacray import conette_model

log = logging.getLogger("aacray.encoder")

N_MELS = 224
EMBED_DIM = 768
N_CLASSES = 527  # AudioSet
DEPTHS = (3, 3, 9, 3)
DIMS = (96, 192, 384, 768)
TIME_REDUCTION = 32  # stem 4 x three stride-2 downsamplings
MIN_FRAMES = 24  # fewer log-mel frames give S = 0
DEFAULT_SEED = 0
ENCODERS = ("convnext_tiny", "logmel_pool")

# The authors' front-end (torchlibrosa), kept to build the checkpoint's buffers.
SAMPLE_RATE = 32_000
N_FFT = 1024
HOP = 320
F_MIN = 50.0
F_MAX = 14_000.0
AMIN = 1e-10


def n_frames_out(n_frames: int | Tensor) -> int | Tensor:
    """Number of embedding frames S for a clip of `n_frames` log-mel frames.

    Works on ints and on integer tensors, e.g. the valid lengths (B,) of a padded batch.
    For a padded batch the first n_frames_out(valid) output frames belong to the clip; the
    last of them see some padding through the convolutions' receptive field, so they are
    close to, not equal to, the clip's embedding computed alone.
    """
    return (n_frames + 8) // TIME_REDUCTION


def _check_logmel(logmel: Tensor) -> None:
    assert logmel.ndim == 3 and logmel.shape[-1] == N_MELS, (
        f"expected log-mel (B, T_frames, {N_MELS}), got {logmel.shape=}"
    )
    if logmel.shape[1] < MIN_FRAMES:
        raise ValueError(
            f"clip too short: {logmel.shape[1]} log-mel frames, at least {MIN_FRAMES} "
            f"(~{MIN_FRAMES * HOP / SAMPLE_RATE:.2f} s) are needed for one embedding frame"
        )


# --- ConvNeXt-Tiny --------------------------------------------------------------------


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of (B, C, H, W) maps; same parameters as nn.LayerNorm."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv, LayerNorm, MLP x4 with GELU, layer scale `gamma`, residual."""

    def __init__(self, dim: int, layer_scale_init: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        y = self.dwconv(x).permute(0, 2, 3, 1)  # channels last for the norm and the MLP
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class _Tensors(nn.Module):
    """A bare holder of named buffers, so that state dict keys follow torchlibrosa's layout."""

    def __init__(self, **buffers: Tensor) -> None:
        super().__init__()
        for name, value in buffers.items():
            self.register_buffer(name, value)


def _stft_kernels() -> tuple[Tensor, Tensor]:
    """torchlibrosa's Conv1d STFT kernels: real and imaginary parts, each (513, 1, 1024)."""
    window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float64)
    k = torch.arange(N_FFT // 2 + 1, dtype=torch.float64)[:, None]
    n = torch.arange(N_FFT, dtype=torch.float64)[None, :]
    phase = -2 * math.pi * ((k * n) % N_FFT) / N_FFT
    real = (torch.cos(phase) * window)[:, None, :].float()
    imag = (torch.sin(phase) * window)[:, None, :].float()
    return real, imag


def _mel_filters() -> Tensor:
    """librosa.filters.mel(sr=32000, n_fft=1024, n_mels=224, fmin=50, fmax=14000).T: (513, 224)."""
    return torchaudio.functional.melscale_fbanks(
        N_FFT // 2 + 1, F_MIN, F_MAX, N_MELS, SAMPLE_RATE, norm="slaney", mel_scale="slaney"
    )


class ConvNeXtTinyAudio(nn.Module):
    """The authors' ConvNeXt-Tiny AudioSet tagger, fed precomputed log-mel.

    Attribute names reproduce the authors' state dict keys exactly (see the module
    docstring); `forward` gives frame embeddings.
    """

    embed_dim = EMBED_DIM

    def __init__(self) -> None:
        super().__init__()
        real, imag = _stft_kernels()
        self.spectrogram_extractor = _Tensors()
        self.spectrogram_extractor.stft = _Tensors()
        self.spectrogram_extractor.stft.conv_real = _Tensors(weight=real)
        self.spectrogram_extractor.stft.conv_imag = _Tensors(weight=imag)
        self.logmel_extractor = _Tensors(melW=_mel_filters())
        self.bn0 = nn.BatchNorm2d(N_MELS)

        stem = nn.Sequential(
            nn.Conv2d(1, DIMS[0], kernel_size=(4, 4), stride=(4, 4), padding=(4, 0)),
            ChannelsFirstLayerNorm(DIMS[0], eps=1e-6),
        )
        downsamples = [
            nn.Sequential(
                ChannelsFirstLayerNorm(c_in, eps=1e-6),
                nn.Conv2d(c_in, c_out, kernel_size=2, stride=2),
            )
            for c_in, c_out in zip(DIMS[:-1], DIMS[1:], strict=True)
        ]
        self.downsample_layers = nn.ModuleList([stem, *downsamples])
        self.stages = nn.ModuleList(
            nn.Sequential(*(ConvNeXtBlock(dim) for _ in range(depth)))
            for depth, dim in zip(DEPTHS, DIMS, strict=True)
        )
        self.norm = nn.LayerNorm(DIMS[-1], eps=1e-6)
        self.head_audioset = nn.Linear(DIMS[-1], N_CLASSES)
        self.apply(_init_weights)

    def _feature_maps(self, logmel: Tensor) -> Tensor:
        """(B, T_frames, 224) -> (B, 768, S, 7), S = n_frames_out(T_frames)."""
        _check_logmel(logmel)
        x = self.bn0(logmel.transpose(1, 2)[..., None])  # mel bins as BatchNorm channels
        x = x.squeeze(-1).transpose(1, 2)[:, None]  # (B, 1, T_frames, 224)
        for downsample, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(downsample(x))
        return x

    def forward(self, logmel: Tensor) -> Tensor:
        """Log-mel (B, T_frames, 224) -> frame embeddings (B, 768, S)."""
        return self._feature_maps(logmel).mean(dim=3)

    forward_frames = forward

    def clip_logits(self, logmel: Tensor) -> Tensor:
        """Log-mel (B, T_frames, 224) -> AudioSet logits (B, 527): the authors' tagging path."""
        frames = self.forward(logmel)
        pooled = frames.amax(dim=2) + frames.mean(dim=2)
        return self.head_audioset(self.norm(pooled))

    @torch.no_grad()
    def waveform_to_logmel(self, wav: Tensor) -> Tensor:
        """Waveform (B, n_samples) at 32 kHz -> log-mel (B, n_samples // 320 + 1, 224).

        The authors' front-end, with the checkpoint's own STFT kernels and mel filters: a
        reference for aacray/audio.py, not the pipeline's path.
        """
        assert wav.ndim == 2, f"{wav.shape=}"
        stft = self.spectrogram_extractor.stft
        x = F.pad(wav[:, None], (N_FFT // 2, N_FFT // 2), mode="reflect")
        power = F.conv1d(x, stft.conv_real.weight, stride=HOP) ** 2
        power = power + F.conv1d(x, stft.conv_imag.weight, stride=HOP) ** 2
        mel = power.transpose(1, 2) @ self.logmel_extractor.melW
        return 10.0 * torch.log10(mel.clamp(min=AMIN))


def _init_weights(m: nn.Module) -> None:
    """The authors' init: truncated normal (std 0.02) weights and zero biases."""
    if isinstance(m, nn.Conv2d | nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)


# --- weight-free baseline -------------------------------------------------------------


class LogmelPoolEncoder(nn.Module):
    """Weight-free encoder with the ConvNeXt output contract.

    Time: the average of each 32-frame window [32 s - 4, 32 s + 28), padding excluded,
    i.e. the frames ConvNeXt output frame s is aligned with, so S = n_frames_out(T_frames).
    Frequency: the 224 mel bins linearly interpolated to 768 points, end points kept
    (output j sits at mel position j * 223 / 767).
    Scale: a fixed affine map (dB + 30) / 15 puts typical log-mel values (about -60 to
    +15 dB) near [-2, 3], the range of the ConvNeXt embeddings, so the decoder recipe
    (lr, weight decay) needs no change. No statistics are computed: a clip's embedding
    never depends on the batch.
    """

    DB_SHIFT = 30.0
    DB_SCALE = 15.0

    embed_dim = EMBED_DIM

    def forward(self, logmel: Tensor) -> Tensor:
        """Log-mel (B, T_frames, 224) -> (B, 768, S)."""
        _check_logmel(logmel)
        pooled = F.avg_pool1d(
            logmel.transpose(1, 2),
            kernel_size=TIME_REDUCTION,
            stride=TIME_REDUCTION,
            padding=4,
            count_include_pad=False,
        )  # (B, 224, S)
        widened = F.interpolate(
            pooled.transpose(1, 2), size=EMBED_DIM, mode="linear", align_corners=True
        )  # (B, S, 768)
        return ((widened + self.DB_SHIFT) / self.DB_SCALE).transpose(1, 2)

    forward_frames = forward


# --- loading --------------------------------------------------------------------------


def _freeze(module: nn.Module, device: str | torch.device) -> nn.Module:
    module = module.to(device).eval()
    module.requires_grad_(False)
    return module


def _read_state_dict(uri: str) -> tuple[dict[str, Tensor], str]:
    """Read a checkpoint through fsspec: (state dict, sha256 of the file)."""
    with fsspec.open(uri, "rb") as f:
        data = f.read()
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{uri}: refused to load this checkpoint: it needs pickled code beyond plain "
            "tensors and containers, and only plain state dicts are accepted "
            "(torch.load(weights_only=True)). If you trust the file, re-save it as "
            "torch.save({'model': state_dict}, path). Loader said: "
            f"{str(e).splitlines()[0]}"
        ) from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"{uri}: not a state dict: expected {{'model': {{name: tensor}}}} or {{name: tensor}}"
        )
    return state, sha256


def load_encoder(
    checkpoint: str | None,
    device: str | torch.device = "cpu",
    seed: int = DEFAULT_SEED,
) -> tuple[ConvNeXtTinyAudio, dict]:
    """The frozen ConvNeXt-Tiny encoder (eval mode, no gradients) and its provenance.

    checkpoint: a local path or URI (s3://...) of the authors' state dict (under "model",
    or bare), or a CoNeTTE model folder (its `preprocessor.encoder.*` weights,
    aacray/conette_model.py), loaded with strict key matching; None gives a seeded random
    init and a warning. Provenance: {"encoder", "checkpoint", "random_init", "sha256", "seed"}.
    """
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(seed)
        model = ConvNeXtTinyAudio()
    provenance = {"encoder": "convnext_tiny", "checkpoint": checkpoint, "sha256": None}
    if checkpoint is None:
        log.warning(
            "ConvNeXt-Tiny encoder is RANDOMLY INITIALISED (seed %d): no checkpoint was "
            "given, so its embeddings carry no pretrained meaning. Pass the authors' "
            "convnext_tiny_465mAP_BL_AC_70kit.pth or convnext_tiny_471mAP.pth for real results.",
            seed,
        )
        provenance |= {"random_init": True, "seed": seed}
    elif conette_model.is_folder(checkpoint):  # the ConvNeXt inside a CoNeTTE model folder
        sha256 = conette_model.load_encoder_weights(model, checkpoint)
        log.info("loaded ConvNeXt-Tiny encoder from the CoNeTTE folder %s (sha256 %s)", checkpoint, sha256)
        provenance |= {"random_init": False, "sha256": sha256, "seed": None}
    else:
        state, sha256 = _read_state_dict(checkpoint)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(
                f"{checkpoint}: state dict does not match the authors' ConvNeXt-Tiny "
                f"(strict key matching): {e}"
            ) from e
        log.info("loaded ConvNeXt-Tiny encoder from %s (sha256 %s)", checkpoint, sha256)
        provenance |= {"random_init": False, "sha256": sha256, "seed": None}
    return _freeze(model, device), provenance


def build_encoder(
    name: str = "convnext_tiny",
    checkpoint: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict]:
    """Encoder by name ("convnext_tiny" or "logmel_pool") -> (frozen module, provenance).

    Both map log-mel (B, T_frames, 224) to (B, 768, S) with S = n_frames_out(T_frames).
    """
    if name == "convnext_tiny":
        return load_encoder(checkpoint, device=device)
    if name == "logmel_pool":
        if checkpoint is not None:
            raise ValueError(f"encoder 'logmel_pool' has no weights; got checkpoint={checkpoint!r}")
        provenance = {
            "encoder": "logmel_pool",
            "checkpoint": None,
            "random_init": False,
            "sha256": None,
            "seed": None,
        }
        return _freeze(LogmelPoolEncoder(), device), provenance
    raise ValueError(f"unknown encoder {name!r}; choices: {', '.join(ENCODERS)}")


def encode_logmels(model: nn.Module, logmels: list[np.ndarray], device: str | torch.device = "cpu") -> list[np.ndarray]:
    """Log-mels [(T_i, 224)] -> frame embeddings [(S_i, 768)] float32, in order. Clips of
    equal length share a forward; none is padded, so batching never changes a result.
    The one audio -> frames step of extract_embeddings and aacray.api."""
    by_len: dict[int, list[int]] = {}
    for i, x in enumerate(logmels):
        by_len.setdefault(x.shape[0], []).append(i)
    out: list[np.ndarray] = [np.empty(0)] * len(logmels)
    with torch.inference_mode():
        for idx in by_len.values():
            x = torch.from_numpy(np.stack([np.asarray(logmels[i], np.float32) for i in idx])).to(device)
            emb = model(x).float().cpu().numpy()  # (B, 768, S)
            for j, i in enumerate(idx):
                out[i] = emb[j].T.copy()  # (S, 768)
    return out
