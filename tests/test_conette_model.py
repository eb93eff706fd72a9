"""A CoNeTTE model folder (the authors' released captioner) read by aacray, against the
authors' own code (conette 0.3.2 through conette_ref; the folder is built from their modules
by tests/conette_folder.py).

- every key of the weights is mapped, checked or ignored; an unknown key, a missing tensor, a
  wrong shape, a non-sinusoid position table or task ids that do not match the vocabulary
  are refused naming the key; pickled code in the weights is refused and the pickled
  `_extra_state_` is never unpickled;
- per-pair losses (aacray's scorer) equal conette's teacher-forced cross-entropy with its
  masking (words and eos, not the task token), for two tasks;
- beam-search captions (aacray's default search, the folder's settings) equal conette's
  `generate` with the task token and the folder's forbid_rep_mask;
- frame embeddings (aacray's front-end + ConvNeXt with the folder's weights) equal the
  authors' CoNeTTEPreprocessor on a waveform (32 kHz mono, 44.1 kHz stereo);
- score_matrix on Ray with the folder equals the in-process losses; an s3:// folder loads;
- the README's "Use the authors' model" snippet runs as written (aacray.api).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import re
import types
from pathlib import Path

import conette_folder
import conette_ref
import numpy as np
import pytest
import soundfile as sf
import torch
from conette_folder import SENTENCES

from aacray import audio, conette_model, storage
from aacray import checkpoint as ckpt_lib
from aacray.decoder import pad_frames
from aacray.decoding import beam_search, content_word_mask
from aacray.encoder import build_encoder, encode_logmels, load_encoder
from aacray.errors import CheckpointError
from aacray.scorer import PairScorer

TEXTS = [*SENTENCES, "a bell rings", "birds chirp and a dog barks loudly"]
LENGTHS = [7, 3, 5, 6, 2]
README = Path(__file__).resolve().parents[1] / "README.md"


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def ref() -> types.SimpleNamespace:
    names = {"forcing": "nn.decoding.forcing", "beam": "nn.decoding.beam", "ce": "nn.loss.ce_mean"}
    return types.SimpleNamespace(**{k: conette_ref.load(v) for k, v in names.items()})


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> conette_folder.Built:
    """A decoder-only folder (small): what scoring and captioning read."""
    return conette_folder.build(tmp_path_factory.mktemp("conette") / "dec", seed=1)


@pytest.fixture(scope="module")
def built_full(tmp_path_factory) -> conette_folder.Built:
    """The hub's layout: decoder and ConvNeXt in one weights file (~118 MB)."""
    return conette_folder.build(tmp_path_factory.mktemp("conette") / "full", seed=3, encoder=True)


def frames_batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    frames = [rng.standard_normal((n, 768)).astype(np.float32) for n in LENGTHS]
    return frames, *pad_frames(frames)


def conette_losses(b, ref, x, mask, texts, task) -> np.ndarray:
    """conette's validation loss per pair: teacher forcing on [task token, words, eos] and
    CrossEntropyLossMean over the non-pad targets (CoNeTTEPLM.validation_step)."""
    caps = b.tok.encode_batch(texts, add_bos_eos=True, padding="batch")
    caps[:, 0] = b.task_ids[task]  # CoNeTTEPLM.replace_first_ids_in_batch
    crit = ref.ce.CrossEntropyLossMean(ignore_index=b.tok.pad_token_id, dim=1)
    out = np.zeros((x.shape[0], len(texts)), np.float32)
    with torch.no_grad():
        for j in range(len(texts)):
            cj = caps[j : j + 1].expand(x.shape[0], -1)
            logits = ref.forcing.teacher_forcing(
                b.dec, b.tok.pad_token_id, b.tok.bos_token_id, b.tok.eos_token_id, b.tok.get_vocab_size(),
                frame_embs=b.proj(x), frame_embs_pad_mask=mask, caps_in=cj[:, :-1],
            )
            out[:, j] = crit(logits, cj[:, 1:]).numpy()
    return out, caps


# --- mapping and safety -------------------------------------------------------------------
def test_every_key_is_mapped_checked_or_ignored(built):
    sd = torch.load(Path(built.folder) / "pytorch_model.bin", weights_only=True)
    folder = conette_model.read_folder(built.folder)
    assert set(folder.decoder) | set(folder.checked) | set(conette_model.IGNORED) == set(sd)
    assert set(folder.checked) == set(conette_model.CHECKED)
    model, tok, info = ckpt_lib.load(built.folder)
    ours = model.state_dict()
    for key, value in folder.decoder.items():
        assert torch.equal(ours[conette_model.decoder_key(key)], value), key
    assert torch.equal(ours["projection.1.weight"], built.proj[2].weight)
    assert torch.equal(ours["word_emb.weight"], built.dec.emb_layer.weight)
    assert model.cfg.n_heads == 4 and model.cfg.d_model == 32 and model.vocab_size == built.tok.get_vocab_size()
    assert info["kind"] == "conette" and info["task"] == "clotho" and info["decoding"] == {"beam_size": 3, "min_len": 3, "max_len": 20}
    assert torch.equal(content_word_mask(tok), built.forbid)  # the folder's mask, through the stopwords


def test_safetensors_folder_loads_the_same_and_is_preferred(built, tmp_path):
    tensors = torch.load(Path(built.folder) / "pytorch_model.bin", weights_only=True)
    st = conette_folder.write_folder(tmp_path / "st", built.config, tensors, fmt="safetensors")
    a, _, _ = ckpt_lib.load(built.folder)
    b, _, info = ckpt_lib.load(st)
    assert info["weights"] == "model.safetensors"
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    torch.save({"junk": torch.zeros(1)}, tmp_path / "st" / "pytorch_model.bin")  # ignored: safetensors first
    assert ckpt_lib.load(st)[2]["weights"] == "model.safetensors"


class _Payload:
    """Unpickling this runs code: it would write the file named by `path`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path(self.path).write_text, ("pickled code ran",))


def test_weights_holding_pickled_code_are_refused(built, tmp_path):
    marker = tmp_path / "ran.txt"
    tensors = torch.load(Path(built.folder) / "pytorch_model.bin", weights_only=True)
    bad = tmp_path / "bad"
    conette_folder.write_folder(bad, built.config, {**tensors, "model.hook": _Payload(str(marker))})
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused: only plain tensors") as e:
        ckpt_lib.load(str(bad))
    assert "safetensors" in str(e.value) and not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):
        load_encoder(str(bad))
    assert not marker.exists()


def test_extra_state_is_never_unpickled(built, tmp_path):
    marker = tmp_path / "ran.txt"
    tensors = torch.load(Path(built.folder) / "pytorch_model.bin", weights_only=True)
    evil = torch.frombuffer(bytearray(pickle.dumps(_Payload(str(marker)))), dtype=torch.uint8)
    folder = conette_folder.write_folder(tmp_path / "x", built.config, {**tensors, "_extra_state_": evil})
    model, _, _ = ckpt_lib.load(folder)
    assert model.vocab_size == built.tok.get_vocab_size() and not marker.exists()


def _damaged(built, tmp_path, change) -> str:
    tensors = dict(torch.load(Path(built.folder) / "pytorch_model.bin", weights_only=True))
    change(tensors)
    return conette_folder.write_folder(tmp_path / "d", built.config, tensors)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.update({"model.decoder.extra.weight": torch.zeros(2)}), r"neither maps nor knows to ignore, e\.g\. \['model\.decoder\.extra\.weight'\]"),
        (lambda t: t.update({"model.something_new": torch.zeros(2)}), r"\['model\.something_new'\]"),
        (lambda t: t.pop("model.decoder.layers.1.linear2.weight"), r"missing tensors: \['model\.decoder\.layers\.1\.linear2\.weight'\]"),
        (lambda t: t.update({"model.decoder.layers.2.linear1.bias": torch.zeros(64)}), r"keys the model has no place for: \['model\.decoder\.layers\.2\.linear1\.bias'\]"),
        (lambda t: t.update({"model.projection.2.weight": torch.zeros(32, 2048)}), r"wrong shapes: \['model\.projection\.2\.weight \(32, 2048\) \(the model needs \(32, 768\)\)'\]"),
        (lambda t: t.pop("model.forbid_rep_mask"), r"missing tensor model\.forbid_rep_mask"),
        (lambda t: t["model.decoder.pos_encoding.pos_embedding"].mul_(2), r"model\.decoder\.pos_encoding\.pos_embedding is not the sinusoid"),
        (lambda t: t["model.task_id_to_token_id"].add_(1), r"model\.task_id_to_token_id is \["),
    ],
    ids=["unknown-decoder-key", "unknown-key", "missing", "extra-layer-key", "shape", "missing-checked", "pos", "task-ids"],
)
def test_strict_mapping_names_the_key(built, tmp_path, change, message):
    with pytest.raises(CheckpointError, match=message):
        ckpt_lib.load(_damaged(built, tmp_path, change))


def test_tasks_and_their_refusals(built, tmp_path):
    _, tok, _ = ckpt_lib.load(built.folder, task="audiocaps")
    assert tok.bos_id == built.task_ids["audiocaps"] and tok.encode("a dog")[0] == tok.bos_id
    assert tok.decode(tok.encode("a dog barks")) == "a dog barks"
    with pytest.raises(CheckpointError, match=r"task 'wavcaps' is not one of this model's tasks \['clotho', 'audiocaps', 'macs', "):
        ckpt_lib.load(built.folder, task="wavcaps")
    from faults import CAPTIONS, write_random_checkpoint

    ours = str(tmp_path / "aacray_ckpt")
    write_random_checkpoint(ours, CAPTIONS)
    assert ckpt_lib.load(ours)[1].bos_id == 1
    with pytest.raises(CheckpointError, match=r"an aacray checkpoint has no task tokens, so task='audiocaps' does not apply"):
        ckpt_lib.load(ours, task="audiocaps")


def test_task_tokens_missing_from_the_vocabulary_are_appended_as_conette_does(tmp_path):
    """A config whose tokenizer_state predates the task tokens: build_model appends them in
    task order, and so does aacray."""
    b = conette_folder.build(tmp_path / "old", seed=1, tasks_in_state=False)
    assert "<bos_clotho>" not in b.config["tokenizer_state"]["tokenizer"]["stoi"]
    _, tok, _ = ckpt_lib.load(b.folder, task="macs")
    assert tok.bos_id == b.task_ids["macs"] and tok.vocab_size == b.tok.get_vocab_size()


# --- equal to the authors' code -----------------------------------------------------------
@pytest.mark.parametrize("task", ["clotho", "audiocaps"])
def test_pair_losses_equal_conette_teacher_forcing(built, ref, task):
    model, tok, _ = ckpt_lib.load(built.folder, task=task)
    frames, x, mask = frames_batch()
    tokens = [tok.encode(t) for t in TEXTS]
    theirs, caps = conette_losses(built, ref, x, mask, TEXTS, task)
    for j, t in enumerate(tokens):  # the same ids, the task token first
        assert t == [i for i in caps[j].tolist() if i != built.tok.pad_token_id], TEXTS[j]
    ours = PairScorer(model, tok.pad_id, frames).loss_matrix(tokens)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    assert np.abs(ours - theirs).max() < 5e-6  # measured 1.4e-6 at mean loss 4.6


@pytest.mark.parametrize("task", ["clotho", "audiocaps"])
def test_beam_search_equals_conette_generate(built, ref, task):
    """The caption job's search (beam_search's defaults, ban_specials on) with the folder's
    decoding settings against conette's generate with the task token and its mask."""
    model, tok, info = ckpt_lib.load(built.folder, task=task)
    _, x, mask = frames_batch(seed=4)
    d = info["decoding"]
    with torch.no_grad():
        preds, scores, _, _ = ref.beam.generate(
            built.dec, built.tok.pad_token_id, torch.full((x.shape[0],), built.task_ids[task]),
            built.tok.eos_token_id, built.tok.get_vocab_size(), frame_embs=built.proj(x), frame_embs_pad_mask=mask,
            beam_size=d["beam_size"], min_pred_size=d["min_len"], max_pred_size=d["max_len"], forbid_rep_mask=built.forbid,
        )
    ours = beam_search(model, x, mask, tok, **d)
    assert [g.text for g in ours] == built.tok.decode_rec(preds)
    for b, g in enumerate(ours):
        row = preds[b].tolist()
        assert g.tokens[0] == built.task_ids[task] and g.tokens[1:] == row[: len(g.tokens) - 1]
        assert all(t == built.tok.pad_token_id for t in row[len(g.tokens) - 1 :])
        assert g.score == pytest.approx(float(scores[b]), abs=1e-5)
    assert len({g.text for g in ours}) > 1


def test_frame_embeddings_equal_conette_convnext(built_full):
    """aacray's front-end (audio.py) and ConvNeXt with the folder's encoder weights (as
    extract_embeddings builds it from encoder.checkpoint=FOLDER) against
    the authors' CoNeTTEPreprocessor (torchlibrosa front-end, their ConvNeXt) on waveforms."""
    encoder, prov = build_encoder("convnext_tiny", built_full.folder)  # extract_embeddings' call
    assert prov["sha256"] and not prov["random_init"]
    rng = np.random.default_rng(0)
    t = np.arange(int(2.5 * 32000)) / 32000
    mono = (0.1 * rng.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    stereo = (0.1 * rng.standard_normal((2, 2 * 44100))).astype(np.float32)
    with torch.no_grad():
        theirs = [
            built_full.pre(torch.from_numpy(mono)[None], sr=32000)["audio"][0].numpy(),
            built_full.pre([torch.from_numpy(stereo)], sr=[44100])["audio"][0].numpy(),
        ]
    logmels = [audio.log_mel(mono).numpy(), audio.log_mel(audio.resample(stereo.mean(axis=0), 44100)).numpy()]
    ours = encode_logmels(encoder, logmels)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=5e-5)  # measured 2.9e-6 and 6.2e-6, |x| up to 2.6
    assert float(np.abs(theirs[0]).mean()) > 0.1  # a forward that does something


# --- the jobs and the API -----------------------------------------------------------------
def test_score_matrix_on_ray_equals_in_process(built, ref, tmp_path, ray_local):
    from faults import write_extract_output

    from aacray.config import ScoreConfig, from_dict
    from aacray.scoring import run_score_matrix

    frames, x, mask = frames_batch(seed=2)
    ids = [f"a{i}" for i in range(len(frames))]
    caps = [(f"c{j}", "evaluation", t, ids[j % len(ids)]) for j, t in enumerate(TEXTS)]
    ext = write_extract_output(str(tmp_path / "ext"), ids, ["evaluation"] * len(ids), frames, caps)
    out = str(tmp_path / "score")
    run_score_matrix(from_dict(ScoreConfig, {
        "checkpoint": built.folder, "task": "audiocaps", "audio": ext, "captions": ext, "output": out, "k": 3,
        "caption_block_size": 3, "write_scores": True, "plots": False, "dcase_export": False,
        "actors": {"num_actors": 1, "num_cpus": 1},
    }))
    df = storage.read_table(out, "scores").to_pandas()
    got = df.pivot(index="audio_id", columns="caption_id", values="loss").loc[ids, [c[0] for c in caps]].to_numpy()
    model, tok, _ = ckpt_lib.load(built.folder, task="audiocaps")
    in_process = PairScorer(model, tok.pad_id, frames).loss_matrix([tok.encode(t) for t in TEXTS])
    np.testing.assert_allclose(got, in_process, rtol=0, atol=1e-6)
    theirs, _ = conette_losses(built, ref, x, mask, TEXTS, "audiocaps")
    np.testing.assert_allclose(got, theirs, rtol=0, atol=1e-5)
    info = storage.read_json(storage.join(out, "metrics.json"))["checkpoint"]
    assert info["kind"] == "conette" and info["task"] == "audiocaps"


def test_folder_on_s3_loads_as_local(built, s3_bucket):
    uri = f"{s3_bucket}/models/conette"
    for name in ("config.json", "pytorch_model.bin"):
        storage.write_bytes(storage.join(uri, name), (Path(built.folder) / name).read_bytes())
    a, ta, _ = ckpt_lib.load(built.folder)
    b, tb, info = ckpt_lib.load(uri)
    assert info["folder"] == uri and ta.to_str() == tb.to_str()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def readme_snippet() -> str:
    """The python block of README.md's "Use the authors' model" section."""
    m = re.search(r"^## Use the authors' model.*?^```python\n(.*?)^```", README.read_text(), re.MULTILINE | re.DOTALL)
    assert m, "README.md has no python block in a '## Use the authors' model' section"
    return m.group(1)


def test_readme_snippet_runs_on_a_conette_folder(built_full, tmp_path):
    """The README's ten lines, run as written in a folder holding `conette` (a CoNeTTE
    folder) and the two clips they name; their results are the API's own and the jobs'."""
    code = readme_snippet()
    assert len(code.strip().splitlines()) <= 10
    os.symlink(built_full.folder, tmp_path / "conette")
    rng = np.random.default_rng(5)
    for name, sr in (("dog.wav", 44100), ("rain.wav", 32000)):
        sf.write(tmp_path / name, (0.2 * rng.standard_normal(2 * sr)).astype(np.float32), sr)
    cwd, out = os.getcwd(), io.StringIO()
    try:
        os.chdir(tmp_path)
        with contextlib.redirect_stdout(out):
            scope: dict = {}
            exec(compile(code, "README.md", "exec"), scope)
    finally:
        os.chdir(cwd)
    printed = out.getvalue()
    print(printed)
    model, r, captions = scope["model"], scope["r"], scope["captions"]
    assert r.losses.shape == (2, 3) and np.isfinite(r.losses).all()
    frames = model.frames([str(tmp_path / "dog.wav"), str(tmp_path / "rain.wav")])
    in_process = PairScorer(model.model, model.tok.pad_id, frames).loss_matrix([model.tok.encode(c) for c in captions])
    np.testing.assert_array_equal(r.losses, in_process)  # the jobs' scorer, brute force below
    for j, caption in enumerate(captions):
        assert r.t2a[caption] == [["dog.wav", "rain.wav"][i] for i in np.argsort(r.losses[:, j], kind="stable")]
    assert r.a2t["dog.wav"] == [captions[j] for j in np.argsort(r.losses[0], kind="stable")]
    span = r.losses.max(axis=0) - r.losses.min(axis=0)
    s = (r.losses[0] - r.losses.min(axis=0)) / np.where(span > 0, span, 1.0)
    assert r.a2t_minmax["dog.wav"] == [captions[j] for j in np.lexsort((r.losses[0], s))]
    x, mask = pad_frames(frames)
    texts = model.caption([str(tmp_path / "dog.wav"), str(tmp_path / "rain.wav")])
    assert texts == [g.text for g in beam_search(model.model, x, mask, model.tok, **model.decoding)]
    # what its four print lines show: exactly these values
    lines = [str(texts), str(r.losses), str(r.t2a["a dog barks"]), f"{r.a2t['dog.wav']} {r.a2t_minmax['dog.wav']}"]
    assert printed == "\n".join(lines) + "\n"


def test_reindex_checks_a_conette_index_with_its_task(built):
    """reindex re-reads the index's checkpoint: a CoNeTTE folder is hashed by its weights
    file and loaded with the task score_matrix recorded; another folder is refused."""
    from aacray.errors import BadInputError
    from aacray.index import Index
    from aacray.reindex import _check_model, index_task

    _, tok, info = ckpt_lib.load(built.folder, task="audiocaps")
    sha = hashlib.sha256(storage.read_bytes(ckpt_lib.weights_path(built.folder))).hexdigest()[:16]
    index = Index("idx", 0, {}, {"checkpoint": built.folder, "checkpoint_info": info, "model_sha": sha})
    assert index_task(index.info) == "audiocaps"
    model = _check_model(index)
    assert model.sha == sha and model.tok.bos_id == tok.token_to_id("<bos_audiocaps>")
    assert model.tok.to_str() == tok.to_str()
    index.info["model_sha"] = "0" * 16
    with pytest.raises(BadInputError, match="is not the one that scored"):
        _check_model(index)
