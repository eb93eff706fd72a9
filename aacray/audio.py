"""Audio front-end: decode, mono, resample to 32 kHz, log-mel (DESIGN.md, the model section).

- Decoding goes through soundfile (wav, flac, ogg...), from bytes, so s3:// works the same.
- Mono is the mean of the channels; resampling is torchaudio's band-limited sinc.
- Log-mel: power STFT (n_fft 1024, Hann window 1024, hop 320, centred, reflect padding),
  224 Slaney-scale mel bands with Slaney area normalisation from 50 to 14000 Hz, then
  10*log10(max(x, 1e-10)) with no top_db clipping: the librosa / torchlibrosa convention the
  authors' ConvNeXt was trained on. A 10 s clip gives 1001 frames.
- Every failure is an `AudioError` whose message names the file and says why, so the
  extraction stage can quarantine it.
"""

from __future__ import annotations

import functools
import io

import numpy as np
import soundfile as sf
import torch
import torchaudio

SAMPLE_RATE = 32_000
N_FFT = 1024
HOP = 320
N_MELS = 224
F_MIN = 50.0
F_MAX = 14_000.0
AMIN = 1e-10


class AudioError(ValueError):
    """A clip that cannot be used; the message says which and why."""


def decode(data: bytes, name: str = "<bytes>") -> tuple[np.ndarray, int]:
    """Bytes of an audio file -> (float32 samples (n,) mono, sample rate)."""
    if len(data) == 0:
        raise AudioError(f"{name}: empty file (0 bytes)")
    try:
        wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise AudioError(f"{name}: not a decodable audio file ({type(e).__name__}: {e})") from None
    if wav.shape[0] == 0:
        raise AudioError(f"{name}: zero-length clip (0 samples)")
    if not np.isfinite(wav).all():
        raise AudioError(f"{name}: samples contain NaN or inf")
    return wav.mean(axis=1), int(sr)


def resample(wav: np.ndarray, sr: int, target: int = SAMPLE_RATE) -> np.ndarray:
    if sr == target:
        return wav
    if sr <= 0:
        raise AudioError(f"invalid sample rate {sr}")
    out = torchaudio.functional.resample(torch.from_numpy(wav), sr, target)
    return out.numpy()


@functools.lru_cache(maxsize=1)
def _melspec() -> torchaudio.transforms.MelSpectrogram:
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=SAMPLE_RATE,
        n_fft=N_FFT,
        win_length=N_FFT,
        hop_length=HOP,
        f_min=F_MIN,
        f_max=F_MAX,
        n_mels=N_MELS,
        window_fn=torch.hann_window,
        power=2.0,
        center=True,
        pad_mode="reflect",
        norm="slaney",
        mel_scale="slaney",
    )


def n_frames(n_samples: int) -> int:
    """Log-mel frames for a clip of n_samples at 32 kHz (centred STFT)."""
    return n_samples // HOP + 1


def log_mel(wav: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Mono 32 kHz samples (n,) -> log-mel (T, 224), T = n // 320 + 1."""
    x = torch.as_tensor(wav, dtype=torch.float32)
    assert x.ndim == 1, f"{x.shape=}"
    if x.numel() < N_FFT // 2 + 1:  # reflect padding needs at least n_fft/2 + 1 samples
        x = torch.nn.functional.pad(x, (0, N_FFT // 2 + 1 - x.numel()))
    mel = _melspec()(x)  # (224, T)
    return (10.0 * torch.log10(torch.clamp(mel, min=AMIN))).T.contiguous()


def load_clip(data: bytes, name: str = "<bytes>", max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode + mono + resample to 32 kHz; returns (samples, original sample rate)."""
    wav, sr = decode(data, name)
    seconds = wav.shape[0] / sr
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(
            f"{name}: {seconds:.1f} s is longer than max_seconds={max_seconds}; "
            "cut it or raise max_seconds in the config"
        )
    return resample(wav, sr), sr
