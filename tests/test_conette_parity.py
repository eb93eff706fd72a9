"""aacray against the authors' own code (conette 0.3.2, loaded by conette_ref from its sdist).

Each test runs conette's function and aacray's on the same inputs (the same weights, mapped
by name; the same texts; the same draws) and compares the results: the decoder's logits
and beam search, the content-word mask and CoNeTTE's decoding defaults, the text
normalisation and word splitting (conette's AACTokenizer on spaCy's rule-based English
tokenizer), SpecAugment's stripes, and the weight-decay groups.
"""

from __future__ import annotations

import inspect
import random
import re
import types

import conette_ref
import pytest
import torch

from aacray.decoder import CaptionDecoder, DecoderConfig, _stripe_draws, spec_augment_frames
from aacray.decoding import beam_search, content_word_mask
from aacray.text import WordTokenizer, _clean_chars_v2, _exceptions, words


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: intra-op threads only cost time (a lot, on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ref() -> types.SimpleNamespace:
    names = {
        "beam": "nn.decoding.beam",
        "forcing": "nn.decoding.forcing",
        "tfmer": "nn.decoders.aac_tfmer",
        "common": "pl_modules.common",
        "hf_config": "huggingface.config",
        "spec_aug": "transforms.audio.spec_aug",
        "optimizers": "optim.optimizers",
    }
    return types.SimpleNamespace(**{k: conette_ref.load(v) for k, v in names.items()})


# --- the decoder and beam search ----------------------------------------------------------
WORDS = (
    "a the and of in while then is dog barks car passes rain falls birds chirp wind blows "
    "door slams water runs man speaks loudly softly engine hums bell rings"
).split()


@pytest.fixture(scope="module")
def tok() -> WordTokenizer:
    return WordTokenizer.build([" ".join(WORDS)])


def tiny_model(tok: WordTokenizer, seed: int, peaked: float = 3.0) -> CaptionDecoder:
    torch.manual_seed(seed)
    cfg = DecoderConfig(emb_dim=48, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=24)
    model = CaptionDecoder(cfg, tok.vocab_size, pad_id=tok.pad_id)
    with torch.no_grad():
        model.classifier.weight.mul_(peaked)
    return model.eval()


def audio_batch(lengths: list[int], emb_dim: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    frames = torch.randn(len(lengths), S, emb_dim, generator=g)
    mask = torch.arange(S)[None] >= torch.tensor(lengths)[:, None]
    return frames.masked_fill(mask[..., None], 0.0), mask


def conette_model(model: CaptionDecoder, tok: WordTokenizer, ref):
    """conette's projection (build_proj_lin) and AACTransformerDecoder holding aacray's
    weights, mapped by name; the sinusoid is conette's own (and must equal aacray's)."""
    cfg = model.cfg
    proj = ref.common.build_proj_lin(cfg.emb_dim, cfg.d_model, False, cfg.proj_dropout)
    dec = ref.tfmer.AACTransformerDecoder(
        vocab_size=model.vocab_size,
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        acti_name="gelu",
        d_model=cfg.d_model,
        dim_feedforward=cfg.d_ff,
        dropout=cfg.dropout,
        nhead=cfg.n_heads,
        num_decoder_layers=cfg.n_layers,
    )
    proj_state, dec_state = {}, {}
    for k, v in model.state_dict().items():
        if k.startswith(
            "projection.1."
        ):  # Dropout, Linear, ReLU, Dropout vs Dropout, Identity, Linear, ...
            proj_state[k.replace("projection.1.", "2.")] = v
        elif k == "word_emb.weight":
            dec_state["emb_layer.weight"] = v
        elif k.startswith("transformer.layers."):
            dec_state[k.removeprefix("transformer.")] = v
        elif k.startswith("classifier."):
            dec_state[k] = v
        else:
            raise AssertionError(f"aacray weight {k} has no conette counterpart")
    pe = dec.state_dict()["pos_encoding.pos_embedding"]
    torch.testing.assert_close(pe[: cfg.max_len, 0], model.token_pe, rtol=0, atol=1e-6)
    proj.load_state_dict(proj_state, strict=True)
    dec.load_state_dict(dec_state | {"pos_encoding.pos_embedding": pe}, strict=True)
    return proj.eval(), dec.eval()


def test_decoder_logits_equal_conette_teacher_forcing(tok, ref):
    model = tiny_model(tok, seed=0)
    proj, dec = conette_model(model, tok, ref)
    frames, mask = audio_batch([7, 3, 5], seed=1)
    tokens, _ = tok.encode_batch(["a dog barks then the car passes", "rain falls", "a man speaks"])
    with torch.no_grad():
        ours = model(frames, mask, tokens)
        theirs = ref.forcing.teacher_forcing(
            dec,
            tok.pad_id,
            tok.bos_id,
            tok.eos_id,
            tok.vocab_size,
            frame_embs=proj(frames),
            frame_embs_pad_mask=mask,
            caps_in=tokens,
        )  # (B, V, T)
    real = tokens != tok.pad_id
    torch.testing.assert_close(ours[real], theirs.permute(0, 2, 1)[real], rtol=1e-4, atol=1e-5)


def conette_generate(model, tok, ref, frames, mask, K, min_len, max_len, forbid_repeats):
    proj, dec = conette_model(model, tok, ref)
    rep = None
    if forbid_repeats:
        rep = ref.common.get_forbid_rep_mask("content_words", _ConetteVocab(tok), "cpu")
    with torch.no_grad():
        preds, scores, _, _ = ref.beam.generate(
            dec,
            tok.pad_id,
            tok.bos_id,
            tok.eos_id,
            tok.vocab_size,
            frame_embs=proj(frames),
            frame_embs_pad_mask=mask,
            beam_size=K,
            min_pred_size=min_len,
            max_pred_size=max_len,
            forbid_rep_mask=rep,
        )
    return preds, scores


class _ConetteVocab:
    """The three AACTokenizer methods conette's forbid-repetition mask reads."""

    def __init__(self, tok: WordTokenizer) -> None:
        self.tok = tok

    def get_vocab_size(self) -> int:
        return self.tok.vocab_size

    def has(self, w: str) -> bool:
        return self.tok.token_to_id(w) is not None

    def token_to_id(self, w: str) -> int:
        return self.tok.token_to_id(w)

    def get_level(self) -> str:
        return "word"


CASES = [  # beam, min_len, max_len, forbid_repeats
    (3, 3, 20, True),  # CoNeTTE's setting
    (3, 3, 20, False),
    (1, 0, 12, True),
    (4, 5, 9, True),
    (2, 0, 6, False),
]


def compare_with_conette(model, tok, ref, frames, mask, case, ban_specials):
    K, min_len, max_len, forbid = case
    ours = beam_search(
        model,
        frames,
        mask,
        tok,
        beam_size=K,
        min_len=min_len,
        max_len=max_len,
        forbid_repeats=forbid,
        ban_specials=ban_specials,
    )
    preds, scores = conette_generate(model, tok, ref, frames, mask, K, min_len, max_len, forbid)
    for b, g in enumerate(ours):
        n = len(g.tokens) - 1
        row = preds[b].tolist() + [tok.pad_id] * max_len
        assert g.tokens[1:] == row[:n], (b, case, g.tokens, row)
        assert all(t == tok.pad_id for t in row[n:max_len]), (b, case, row)
        assert g.score == pytest.approx(float(scores[b]), abs=1e-5), (b, case)
    return ours


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_beam_search_equals_conette_generate(tok, ref, case, seed):
    """ban_specials=False is conette's search: same tokens, same mean log-probs."""
    model = tiny_model(tok, seed=seed)
    frames, mask = audio_batch([7, 3, 5, 6, 2, 4], seed=seed + 10)
    compare_with_conette(model, tok, ref, frames, mask, case, ban_specials=False)


def test_beam_parity_cases_exercise_the_rules(tok, ref):
    """The cases above meet what makes conette's search differ from a plain one: captions
    cut at max_len and ended by eos, and outputs the repetition rule changes."""
    cut = ended = changed = 0
    for seed in (0, 1):
        model = tiny_model(tok, seed=seed)
        frames, mask = audio_batch([7, 3, 5, 6, 2, 4], seed=seed + 10)
        for K, lo, hi, _ in CASES:
            kw = dict(beam_size=K, min_len=lo, max_len=hi, ban_specials=False)
            on = beam_search(model, frames, mask, tok, forbid_repeats=True, **kw)
            off = beam_search(model, frames, mask, tok, forbid_repeats=False, **kw)
            cut += sum(g.tokens[-1] != tok.eos_id for g in on + off)
            ended += sum(g.tokens[-1] == tok.eos_id for g in on + off)
            changed += sum(a.tokens != b.tokens for a, b in zip(on, off, strict=True))
    assert cut and ended and changed


def test_default_search_equals_conette_when_specials_are_improbable(tok, ref):
    """aacray's default also bans pad, bos and unk; on a model that gives them no
    probability (as a trained one nearly does) it is conette's search again."""
    model = tiny_model(tok, seed=3)
    with torch.no_grad():
        model.classifier.bias[[tok.pad_id, tok.bos_id, tok.unk_id]] = float("-inf")
    frames, mask = audio_batch([5, 8, 2, 6], seed=3)
    for case in CASES[:3]:
        compare_with_conette(model, tok, ref, frames, mask, case, ban_specials=True)


def test_beam_search_equals_conette_on_a_trained_model(ref, tmp_path):
    """Weights from aacray's training loop (the paper's recipe, 12 epochs in process on a
    small corpus of random clips and captions, so the vocabulary and the specials carry
    learnt probabilities): conette's search and aacray's (ban_specials=False) give the same
    captions and scores, with and without the repetition rule. aacray's default also bans
    pad, bos and unk, which this lightly trained model still gives some probability: its
    captions hold none of them (and may differ from conette's where a beam held one)."""
    from test_train import write_train_extract

    from aacray import checkpoint as ckpt_lib
    from aacray.config import TrainConfig, from_dict
    from aacray.decoder import pad_frames
    from aacray.embeddings import read_embeddings
    from aacray.train import fit_in_process, run_train

    ext = write_train_extract(str(tmp_path / "ext"), n_dev=24, n_val=6)
    out = str(tmp_path / "train")
    model_cfg = {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64}
    cfg = {"embeddings": ext, "output": out, "epochs": 12, "batch_size": 8, "num_workers": 1, "model": model_cfg, "select_by": "last"}
    run_train(from_dict(TrainConfig, cfg), fit=fit_in_process)
    model, tok, _ = ckpt_lib.load(out)
    val = read_embeddings(ext, ["validation", "development"])
    frames, mask = pad_frames(val.frames[:10])
    captions = {}
    for case in CASES:
        captions[case] = compare_with_conette(model, tok, ref, frames, mask, case, ban_specials=False)
        default = beam_search(model, frames, mask, tok, beam_size=case[0], min_len=case[1], max_len=case[2], forbid_repeats=case[3])
        banned = {tok.pad_id, tok.bos_id, tok.unk_id}
        assert not any(banned & set(g.tokens[1:]) for g in default), case
    assert len({tuple(g.tokens) for g in captions[CASES[0]]}) > 1  # CoNeTTE's setting: the clips differ


def test_defaults_and_repetition_mask_are_conettes(tok, ref):
    cfg = ref.hf_config.CoNeTTEConfig()
    params = inspect.signature(beam_search).parameters
    got = tuple(params[k].default for k in ("beam_size", "min_len", "max_len", "forbid_repeats"))
    assert got == (cfg.beam_size, cfg.min_pred_size, cfg.max_pred_size, True) == (3, 3, 20, True)
    theirs = ref.common.get_forbid_rep_mask("content_words", _ConetteVocab(tok), "cpu")
    assert torch.equal(content_word_mask(tok), theirs)


# --- text -------------------------------------------------------------------------------
SENTENCES = [
    "A man's voice; it doesn't stop.",
    "A high-pitched beep -- then a low-pitched hum",
    "Someone  is   talking   while  birds chirp",
    "The dogs' barking isn't loud, they're far away",
    "I'm sure it'll rain: we've seen clouds, haven't we?",
    "A 10kg weight drops 3 times at 5pm, then 2 more; 1990s music",
    "Rock'n'roll plays on the radio 'loudly' at 12am",
    "“Quoted” speech … and an ellipsis… plus `backticks` and ’curly’ ones",
    "A car & a truck pass by (slowly) [far] {near} *honk* #busy / now+later_too~ ʘ ×2 \\ end",
    "<pad>Someone says <unk> and <eos> loudly<bos>",
    "Don't dont can't cant won't wont gonna gotta cannot y'all c'mon o'clock ma'am",
    "Wind-blown leaves rustle; a door's hinge creaks, doin' nothin'",
    "  Leading and trailing spaces  ",
    "CAPITAL LETTERS and MiXeD case, He's there's what's",
    "a 2nd bird and a 3rd chirp, 100m away, 50 people",
    "café naïve façade résumé",
    "",
]


@pytest.fixture(scope="module")
def conette_tokenizer():
    return conette_ref.aac_tokenizer()


@pytest.mark.parametrize("text", SENTENCES)
def test_words_equal_conette_tokenizer(conette_tokenizer, text):
    assert words(text) == conette_tokenizer.tokenize_batch([text])[0]


@pytest.mark.parametrize("text", SENTENCES)
def test_character_steps_equal_conette_normalizers_and_tokenizer_json(conette_tokenizer, text):
    expected = text
    for norm in conette_tokenizer._pre_encoding_normalizers:
        expected = norm.normalize_batch([expected])[0]
    assert _clean_chars_v2(text) == expected
    hf = WordTokenizer.build(SENTENCES)._tok.normalizer  # the tokenizer.json's normaliser
    assert hf.normalize_str(text) == expected


KNOWN_DIFFERENCES = {  # text: aacray's words (conette splits the symbol off / keeps "\t")
    "$5 a dog": ["$5", "a", "dog"],
    "50% of it": ["50%", "of", "it"],
    "a=b": ["a=b"],
    "high «beeps»": ["high", "«beeps»"],
    "5° heat": ["5°", "heat"],
    "a\tb": ["a", "b"],
}


@pytest.mark.parametrize("text", KNOWN_DIFFERENCES)
def test_known_differences_from_conette(conette_tokenizer, text):
    """The differences aacray.text documents: symbols stay attached, tabs separate."""
    assert words(text) == KNOWN_DIFFERENCES[text]
    assert conette_tokenizer.tokenize_batch([text])[0] != KNOWN_DIFFERENCES[text]


def _spacy_tokens():
    import spacy

    return spacy.blank("en").tokenizer


def test_exception_table_is_spacys():
    from spacy.attrs import ORTH

    tok = _spacy_tokens()
    theirs = {
        k: tuple(d[ORTH] for d in v)
        for k, v in tok.rules.items()
        if re.fullmatch(r"[a-z0-9']+", k) and (len(v) > 1 or "'" in k)
    }
    assert _exceptions() == theirs


def test_word_split_equals_spacy_on_apostrophes_and_digits():
    """Every in-domain special case in quote/clitic contexts, plus random strings over
    letters, digits, apostrophes and spaces, split as spaCy's English tokenizer does."""
    tok = _spacy_tokens()
    contexts = ("{}", "'{}", "{}'", "{}'s", "'{}'", "x{}", "{}''", "dog {} 's")
    texts = [c.format(k) for k in _exceptions() for c in contexts]
    rng = random.Random(0)
    alphabet = "abdegiklmnopst'019 "
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10))) for _ in range(3000)]
    bad = []
    for t in texts:
        t = " ".join(t.split())
        if t and words(t) != [x.text for x in tok(t)]:
            bad.append((t, words(t), [x.text for x in tok(t)]))
    assert not bad, bad[:10]


# --- SpecAugment --------------------------------------------------------------------------
def chi_square(counts: list[int], expected: list[float]) -> float:
    return sum((c - e) ** 2 / e for c, e in zip(counts, expected, strict=True))


def recorded_conette_draws(ref, monkeypatch, n_calls, max_width, E, seed):
    """Run conette's DropStripes n_calls times on its own generator; return its draws."""
    real = torch.randint
    widths, starts = [], []

    def recording(low, high, size, generator=None):
        out = real(low, high, size, generator=generator)
        (widths if size == (6,) else starts).append(out.clone())
        return out

    drop = ref.spec_aug.DropStripes(max_width, 6, dim=-1, generator=seed, inplace=False)
    monkeypatch.setattr(ref.spec_aug, "torch", types.SimpleNamespace(randint=recording))
    for _ in range(n_calls):
        drop(torch.ones(1, E))
    monkeypatch.undo()
    return torch.cat(widths), torch.stack(starts)


def test_stripe_widths_are_drawn_as_conette(ref, monkeypatch):
    """Width 2 draws 0 or 1 (exclusive bound), uniformly: chi-square at a fixed seed, and
    the same distribution as conette's DropStripes on its own generator."""
    for max_width, crit in ((2, 10.83), (4, 16.27)):  # chi-square df 1 / 3 at p = 0.001
        w, _ = _stripe_draws(2000, 6, max_width, 768, torch.Generator().manual_seed(0))
        counts = torch.bincount(w.flatten(), minlength=max_width).tolist()
        assert len(counts) == max_width, counts  # no width == max_width
        assert chi_square(counts, [w.numel() / max_width] * max_width) < crit
        cw, _ = recorded_conette_draws(ref, monkeypatch, 2000, max_width, 768, seed=1)
        theirs = torch.bincount(cw, minlength=max_width).tolist()
        assert len(theirs) == max_width
        pooled = [(a + b) / 2 for a, b in zip(counts, theirs, strict=True)]
        assert chi_square(counts, pooled) + chi_square(theirs, pooled) < crit  # homogeneity


def test_stripe_starts_are_drawn_as_conette():
    """A stripe of width w starts uniformly in [0, E - w): never at E - w."""
    E = 8
    w, s = _stripe_draws(4000, 6, 3, E, torch.Generator().manual_seed(2))
    for width, crit in ((1, 22.46), (2, 20.52)):  # chi-square df 6 / 5 at p = 0.001
        got = s[w == width]
        n_starts = E - width
        counts = torch.bincount(got, minlength=n_starts).tolist()
        assert len(counts) == n_starts, counts
        assert chi_square(counts, [got.numel() / n_starts] * n_starts) < crit


def test_spec_augment_equals_conette_drop_stripes_on_the_same_draws(ref, monkeypatch):
    """conette's DropStripes, fed aacray's draws, zeroes the same features; and every draw
    lies in the range conette asks its generator for."""
    B, S, E, n, max_width = 5, 3, 12, 6, 3
    frames = torch.randn(B, S, E, generator=torch.Generator().manual_seed(4)) + 10.0
    ours = spec_augment_frames(frames, n, max_width, generator=torch.Generator().manual_seed(5))
    widths, starts = _stripe_draws(B, n, max_width, E, torch.Generator().manual_seed(5))
    for b in range(B):
        queue = [("widths", widths[b])] + [("start", s) for s in starts[b]]

        def replay(low, high, size, generator=None, queue=queue):
            kind, value = queue.pop(0)
            assert low == 0 and bool((value < high).all()), (kind, value, high)
            assert tuple(value.shape) == tuple(size), (kind, size)
            return value.clone()

        drop = ref.spec_aug.DropStripes(max_width, n, dim=-1, inplace=False)
        monkeypatch.setattr(ref.spec_aug, "torch", types.SimpleNamespace(randint=replay))
        theirs = drop(frames[b])
        monkeypatch.undo()
        assert not queue
        torch.testing.assert_close(ours[b], theirs, rtol=0, atol=0)
    assert (ours == 0).any()


# --- weight decay ---------------------------------------------------------------------------
def test_weight_decay_groups_equal_conette(tok, ref):
    from aacray.config import TrainConfig
    from aacray.train import build_optimizer

    model = tiny_model(tok, seed=0)
    cfg = TrainConfig()
    ours = build_optimizer(model, cfg)
    theirs = ref.optimizers.get_optimizer(
        "AdamW",
        model,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        use_custom_wd=True,
    )

    def decay_of(opt) -> dict[int, float]:
        return {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}

    assert decay_of(ours) == decay_of(theirs)
    assert {(g["lr"], tuple(g["betas"]), g["eps"]) for g in ours.param_groups} == {
        (g["lr"], tuple(g["betas"]), g["eps"]) for g in theirs.param_groups
    }
