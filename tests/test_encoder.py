"""Encoder: architecture and key names against the authors', shapes, strict loading."""

from __future__ import annotations

import hashlib
import logging

import fsspec
import numpy as np
import pytest
import torch

from aacray.encoder import (
    ConvNeXtTinyAudio,
    LogmelPoolEncoder,
    build_encoder,
    load_encoder,
    n_frames_out,
)

# nb_params in topel/audioset-convnext-inf checkpoints/config.yaml and the "# params:"
# line of their scripts/demo_convnext.sbatch.output (trainable parameters of
# convnext_tiny(after_stem_dim=[252, 56])): the published model's size.
AUTHORS_PARAMS = 28_222_767
DEPTHS, DIMS = (3, 3, 9, 3), (96, 192, 384, 768)


class Smuggled:
    """A custom class: pickling it needs code, so weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.fixture(scope="module")
def model() -> ConvNeXtTinyAudio:
    torch.manual_seed(0)
    return ConvNeXtTinyAudio().eval()


def expected_param_count() -> int:
    """ConvNeXt-Tiny with a 1-channel 4x4 stem, bn0 over 224 mel bins and a 527-class head."""
    stem = 1 * 96 * 4 * 4 + 96 + 2 * 96  # conv + LayerNorm
    downs = sum(2 * c + c * d * 2 * 2 + d for c, d in zip(DIMS[:-1], DIMS[1:], strict=True))
    # block: dwconv 7x7 (+bias), LayerNorm, Linear d->4d, Linear 4d->d, gamma
    block = lambda d: 49 * d + d + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d) + d  # noqa: E731
    stages = sum(n * block(d) for n, d in zip(DEPTHS, DIMS, strict=True))
    return 2 * 224 + stem + downs + stages + 2 * 768 + (768 * 527 + 527)


def test_parameter_count_matches_authors(model):
    assert expected_param_count() == AUTHORS_PARAMS
    ours = sum(p.numel() for p in model.parameters())
    assert abs(ours - AUTHORS_PARAMS) <= 0.01 * AUTHORS_PARAMS, ours
    assert ours == AUTHORS_PARAMS


def test_state_dict_keys_are_the_authors(model):
    sd = model.state_dict()
    expected = {
        "spectrogram_extractor.stft.conv_real.weight",
        "spectrogram_extractor.stft.conv_imag.weight",
        "logmel_extractor.melW",
        "norm.weight",
        "norm.bias",
        "head_audioset.weight",
        "head_audioset.bias",
    }
    expected |= {
        f"bn0.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }
    expected |= {
        f"downsample_layers.{i}.{j}.{p}"
        for i in range(4)
        for j in (0, 1)
        for p in ("weight", "bias")
    }
    block = ["dwconv.weight", "dwconv.bias", "norm.weight", "norm.bias", "pwconv1.weight",
             "pwconv1.bias", "pwconv2.weight", "pwconv2.bias", "gamma"]  # fmt: skip
    expected |= {
        f"stages.{i}.{j}.{k}" for i, n in enumerate(DEPTHS) for j in range(n) for k in block
    }
    assert set(sd) == expected
    shapes = {
        "downsample_layers.0.0.weight": (96, 1, 4, 4),  # the audio stem, stride 4x4
        "downsample_layers.0.1.weight": (96,),
        "downsample_layers.1.1.weight": (192, 96, 2, 2),
        "downsample_layers.3.0.weight": (384,),
        "stages.0.0.dwconv.weight": (96, 1, 7, 7),
        "stages.2.8.pwconv1.weight": (1536, 384),
        "stages.3.2.pwconv2.weight": (768, 3072),
        "stages.3.2.gamma": (768,),
        "bn0.running_var": (224,),
        "head_audioset.weight": (527, 768),
        "spectrogram_extractor.stft.conv_real.weight": (513, 1, 1024),
        "logmel_extractor.melW": (513, 224),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    # the front-end tensors are frozen buffers, not parameters
    assert "logmel_extractor.melW" not in dict(model.named_parameters())


@torch.inference_mode()
def test_output_shape_follows_clip_length(model):
    torch.manual_seed(1)
    out = model(torch.randn(1, 1001, 224))
    assert out.shape == (1, 768, 31)
    assert n_frames_out(1001) == 31
    sizes = []
    for seconds in (1, 5, 30):
        t_frames = seconds * 100 + 1  # 32 kHz, hop 320, centred frames
        s = model(torch.randn(1, t_frames, 224)).shape[-1]
        assert s == n_frames_out(t_frames)
        sizes.append(s)
    assert sizes == sorted(sizes) and sizes[0] < 31 < sizes[-1]
    lengths = torch.tensor([1001, 501])
    assert n_frames_out(lengths).tolist() == [31, 15]


def test_too_short_clip_is_refused(model):
    with pytest.raises(ValueError, match="too short"):
        model(torch.zeros(1, 10, 224))


def _save(obj, uri: str) -> None:
    with fsspec.open(uri, "wb") as f:
        torch.save(obj, f)


def test_strict_loading_roundtrip(tmp_path, model):
    path = str(tmp_path / "convnext_tiny.pth")
    _save({"model": model.state_dict(), "test_mAP": 0.465}, path)
    loaded, prov = load_encoder(path)
    assert prov["checkpoint"] == path and prov["random_init"] is False
    with open(path, "rb") as f:
        assert prov["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(1, 301, 224)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)

    bare = str(tmp_path / "bare.pth")  # a bare state dict is accepted too
    _save(model.state_dict(), bare)
    assert load_encoder(bare)[1]["random_init"] is False


@pytest.mark.parametrize("damage", ["missing", "renamed"])
def test_strict_loading_rejects_mismatched_keys(tmp_path, model, damage):
    sd = dict(model.state_dict())
    value = sd.pop("stages.2.4.gamma")
    if damage == "renamed":
        sd["stages.2.4.scale_layer"] = value  # conette's in-memory name
    path = str(tmp_path / f"{damage}.pth")
    _save({"model": sd}, path)
    with pytest.raises(ValueError, match=r"stages\.2\.4\.gamma"):
        load_encoder(path)


def test_pickled_code_is_refused():
    uri = "memory://aacray-test/evil.pth"  # through fsspec, like s3://
    _save({"model": {"w": torch.zeros(2)}, "x": Smuggled()}, uri)
    with pytest.raises(ValueError, match="only plain state dicts") as err:
        load_encoder(uri)
    assert uri in str(err.value)


def test_random_init_warns_and_is_seeded(caplog):
    with caplog.at_level(logging.WARNING, logger="aacray.encoder"):
        a, prov = load_encoder(None)
    assert prov == {"encoder": "convnext_tiny", "checkpoint": None, "random_init": True,
                    "sha256": None, "seed": 0}  # fmt: skip
    warnings = [
        r for r in caplog.records if r.name == "aacray.encoder" and r.levelno == logging.WARNING
    ]
    assert warnings and "RANDOMLY INITIALISED" in warnings[0].getMessage()
    b, _ = load_encoder(None)
    c, _ = load_encoder(None, seed=1)
    w = "stages.1.0.pwconv1.weight"
    torch.testing.assert_close(a.state_dict()[w], b.state_dict()[w], rtol=0, atol=0)
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])
    assert not a.training and not any(p.requires_grad for p in a.parameters())


@torch.inference_mode()
def test_batch_invariance():
    model, _ = load_encoder(None)
    with torch.random.fork_rng():
        torch.manual_seed(2)
        # perturb bn0 so that train-mode batch statistics would differ from eval
        model.bn0.running_mean.normal_(-40.0, 5.0)
        model.bn0.running_var.uniform_(50.0, 200.0)
        clips = torch.randn(2, 301, 224) * 15 - 40
    alone = model(clips[:1])
    together = model(clips)
    torch.testing.assert_close(together[:1], alone, rtol=0, atol=1e-4)


def test_logmel_pool_shape_and_values():
    enc = LogmelPoolEncoder()
    assert enc(torch.zeros(2, 1001, 224)).shape == (2, 768, 31)
    torch.manual_seed(3)
    x = torch.randn(1, 70, 224, dtype=torch.float64)  # S = (70 + 8) // 32 = 2
    out = enc(x)
    assert out.shape == (1, 768, 2)
    xn = x[0].numpy()
    windows = [xn[0:28], xn[28:60]]  # [32 s - 4, 32 s + 28) clipped to the clip
    for s, window in enumerate(windows):
        mean = window.mean(axis=0)
        expected = (np.interp(np.linspace(0, 223, 768), np.arange(224), mean) + 30.0) / 15.0
        np.testing.assert_allclose(out[0, :, s].numpy(), expected, rtol=0, atol=1e-10)


def test_build_encoder_choices():
    enc, prov = build_encoder("logmel_pool", None)
    assert isinstance(enc, LogmelPoolEncoder) and prov["encoder"] == "logmel_pool"
    with pytest.raises(ValueError, match="convnext_tiny, logmel_pool"):
        build_encoder("cnn14", None)
    with pytest.raises(ValueError, match="no weights"):
        build_encoder("logmel_pool", "x.pth")


@torch.inference_mode()
def test_front_end_buffers_reproduce_power_logmel(model):
    """The checkpoint's STFT kernels equal a centred, reflect-padded Hann STFT."""
    torch.manual_seed(4)
    wav = torch.randn(1, 32_000)
    ours = model.waveform_to_logmel(wav)
    assert ours.shape == (1, 101, 224)
    spec = torch.stft(wav, 1024, 320, window=torch.hann_window(1024), center=True,
                      pad_mode="reflect", return_complex=True).abs() ** 2  # fmt: skip
    mel = spec.transpose(1, 2) @ model.logmel_extractor.melW
    torch.testing.assert_close(ours, 10 * torch.log10(mel.clamp(min=1e-10)), rtol=0, atol=1e-3)
    # Slaney mel filters: triangles normalised by band width, 50-14000 Hz, 224 bands
    melw = model.logmel_extractor.melW
    assert melw[:2].sum() == 0 and melw[-1].sum() == 0  # below 50 Hz and at Nyquist
    assert (melw.sum(0) > 0).all()
