"""Beam search: the repetition rule, greedy equivalence, scores, lengths, batching."""

import pytest
import torch

from aacray.decoder import CaptionDecoder, DecoderConfig, pair_loss
from aacray.decoding import beam_search, content_word_mask
from aacray.text import STOPWORDS, WordTokenizer

WORDS = (
    "a the and of in while then is dog barks car passes rain falls birds chirp wind blows "
    "door slams water runs man speaks"
).split()


@pytest.fixture(scope="module")
def tok() -> WordTokenizer:
    return WordTokenizer.build([" ".join(WORDS)])


def tiny_model(tok, seed=0, peaked=4.0) -> CaptionDecoder:
    torch.manual_seed(seed)
    cfg = DecoderConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=32)
    model = CaptionDecoder(cfg, tok.vocab_size, pad_id=tok.pad_id)
    with torch.no_grad():  # sharper distributions: a random model then likes to repeat itself
        model.classifier.weight.mul_(peaked)
    return model.eval()


def audio_batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    frames = torch.randn(len(lengths), S, 768, generator=g)
    mask = torch.arange(S)[None] >= torch.tensor(lengths)[:, None]
    return frames.masked_fill(mask[..., None], 0.0), mask


def content_words(tok, ids):
    return [tok.id_to_token(i) for i in ids[1:-1] if tok.id_to_token(i) not in STOPWORDS]


def greedy_reference(model, frames, tok, min_len, max_len):
    """A plain greedy loop for one unpadded audio (1, S, E), with the same rules."""
    content = content_word_mask(tok)
    ids, used, score = [tok.bos_id], set(), 0.0
    with torch.no_grad():
        for n in range(max_len + 1):
            logp = model(frames, None, torch.tensor([ids]))[0, -1].log_softmax(-1)
            allowed = torch.ones(tok.vocab_size, dtype=torch.bool)
            allowed[[tok.pad_id, tok.bos_id, tok.unk_id]] = False
            if n < min_len:
                allowed[tok.eos_id] = False
            if n >= max_len:
                allowed[:] = False
                allowed[tok.eos_id] = True
            for w in used:
                allowed[w] = False
            nxt = int(logp.masked_fill(~allowed, float("-inf")).argmax())
            score += float(logp[nxt])
            ids.append(nxt)
            if content[nxt]:
                used.add(nxt)
            if nxt == tok.eos_id:
                break
    return ids, score


def test_content_word_mask(tok):
    m = content_word_mask(tok)
    assert m.shape == (tok.vocab_size,)
    assert not m[:4].any()  # specials
    assert not m[tok.token_to_id("the")] and m[tok.token_to_id("dog")]


def test_repetition_rule_on_every_output(tok):
    frames, mask = audio_batch([7, 3, 5, 6, 2, 4, 7, 1], seed=1)
    for seed in range(3):
        model = tiny_model(tok, seed=seed)
        for beam in (1, 3):
            out = beam_search(model, frames, mask, tok, beam_size=beam, min_len=8, max_len=12)
            for g in out:
                cw = content_words(tok, g.tokens)
                assert len(cw) == len(set(cw)), g.text
                assert not {tok.pad_id, tok.bos_id, tok.unk_id} & set(g.tokens[1:])
                assert g.tokens[0] == tok.bos_id and g.tokens[-1] == tok.eos_id
                assert g.tokens.count(tok.eos_id) == 1
                assert g.text == tok.decode(g.tokens)
    # The rule has teeth: without it, the same models do repeat content words.
    repeats = 0
    for seed in range(3):
        out = beam_search(
            tiny_model(tok, seed=seed),
            frames,
            mask,
            tok,
            min_len=8,
            max_len=12,
            forbid_repeats=False,
        )
        repeats += sum(len(set(cw)) < len(cw) for cw in (content_words(tok, g.tokens) for g in out))
    assert repeats > 0


def test_beam_one_equals_greedy_loop(tok):
    model = tiny_model(tok, seed=2)
    frames, mask = audio_batch([6, 3, 5], seed=2)
    for min_len, max_len in ((0, 10), (4, 7), (10, 14)):
        out = beam_search(model, frames, mask, tok, beam_size=1, min_len=min_len, max_len=max_len)
        for b, g in enumerate(out):
            s = int((~mask[b]).sum())
            ids, score = greedy_reference(model, frames[b : b + 1, :s], tok, min_len, max_len)
            assert g.tokens == ids
            assert g.score == pytest.approx(score, abs=1e-4)


@pytest.mark.parametrize("beam", [1, 3, 5])
def test_score_is_teacher_forced_log_likelihood(tok, beam):
    model = tiny_model(tok, seed=3)
    frames, mask = audio_batch([5, 2, 7, 4], seed=3)
    out = beam_search(model, frames, mask, tok, beam_size=beam, min_len=2, max_len=9)
    for b, g in enumerate(out):
        with torch.no_grad():
            loss = pair_loss(
                model, frames[b : b + 1], mask[b : b + 1], torch.tensor([g.tokens]), tok.pad_id
            )
        n_target = len(g.tokens) - 1  # words + eos
        assert g.score == pytest.approx(-float(loss) * n_target, abs=1e-4)
        assert g.score <= 0.0


def test_min_and_max_length(tok):
    frames, mask = audio_batch([5, 3, 6, 2], seed=4)
    for seed in range(2):
        model = tiny_model(tok, seed=seed, peaked=1.0)
        for min_len, max_len in ((3, 5), (6, 6), (0, 2), (0, 0)):
            for g in beam_search(
                model, frames, mask, tok, beam_size=3, min_len=min_len, max_len=max_len
            ):
                n = len(g.tokens) - 2
                assert min_len <= n <= max_len, (min_len, max_len, g.text)
                assert len(g.text.split()) == n
    with pytest.raises(ValueError, match="min_len"):
        beam_search(model, frames, mask, tok, min_len=5, max_len=4)


def test_eos_is_natural_when_allowed(tok):
    """With eos strongly favoured, captions end as soon as min_len allows."""
    model = tiny_model(tok, seed=5)
    with torch.no_grad():
        model.classifier.bias[tok.eos_id] = 50.0
    frames, mask = audio_batch([4, 6], seed=5)
    for min_len in (0, 3):
        for g in beam_search(model, frames, mask, tok, beam_size=3, min_len=min_len, max_len=10):
            assert len(g.tokens) - 2 == min_len


def test_batch_equals_each_audio_alone(tok):
    model = tiny_model(tok, seed=6)
    lengths = [7, 2, 5, 4, 6]
    frames, mask = audio_batch(lengths, seed=6)
    together = beam_search(model, frames, mask, tok, beam_size=3, min_len=2, max_len=10)
    for b, s in enumerate(lengths):
        alone = beam_search(
            model, frames[b : b + 1, :s], None, tok, beam_size=3, min_len=2, max_len=10
        )[0]
        assert alone.tokens == together[b].tokens
        assert alone.score == pytest.approx(together[b].score, abs=1e-4)


def test_restores_training_mode_and_checks_vocab(tok):
    model = tiny_model(tok).train()
    frames, mask = audio_batch([3], seed=7)
    a = beam_search(model, frames, mask, tok, max_len=5)
    b = beam_search(model, frames, mask, tok, max_len=5)
    assert a == b  # eval mode inside: no dropout
    assert model.training
    other = WordTokenizer.build(["just a few words"])
    with pytest.raises(ValueError, match="tokens"):
        beam_search(model, frames, mask, other)
