"""Beam search: the repetition rule, greedy equivalence, scores, lengths, batching.

(Equality with the authors' conette search: tests/test_conette_parity.py.)
"""

import pytest
import torch

from aacray.decoder import CaptionDecoder, DecoderConfig, pair_loss
from aacray.decoding import beam_search, content_word_mask
from aacray.text import STOPWORDS, WordTokenizer

WORDS = (
    "a the and of in while then is dog barks car passes rain falls birds chirp wind blows "
    "door slams water runs man speaks"
).split()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: intra-op threads only cost time (a lot, on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    return [
        tok.id_to_token(i)
        for i in ids[1:]
        if i != tok.eos_id and tok.id_to_token(i) not in STOPWORDS
    ]


def greedy_reference(model, frames, tok, min_len, max_len):
    """A plain greedy loop for one unpadded audio (1, S, E), with the same rules: masks on
    the logits, the mean log-prob of the generated tokens, at most max_len of them."""
    content = content_word_mask(tok)
    ids, logps = [tok.bos_id], []
    with torch.no_grad():
        for n in range(max_len):
            logits = model(frames, None, torch.tensor([ids]))[0, -1]
            allowed = torch.ones(tok.vocab_size, dtype=torch.bool)
            allowed[[tok.pad_id, tok.bos_id, tok.unk_id]] = False
            if n < min_len:
                allowed[tok.eos_id] = False
            for w in ids:
                if content[w]:
                    allowed[w] = False
            logp = logits.masked_fill(~allowed, float("-inf")).log_softmax(-1)
            nxt = int(logp.argmax())
            logps.append(float(logp[nxt]))
            ids.append(nxt)
            if nxt == tok.eos_id:
                break
    return ids, sum(logps) / len(logps)


def test_content_word_mask(tok):
    m = content_word_mask(tok)
    assert m.shape == (tok.vocab_size,)
    assert m[:4].all()  # specials may not repeat either (conette's mask)
    assert not m[tok.token_to_id("the")] and m[tok.token_to_id("dog")]


def check_shape(tok, g, max_len):
    """[bos, words..., eos], or [bos, max_len words] when cut; text decodes the tokens."""
    assert g.tokens[0] == tok.bos_id and g.text == tok.decode(g.tokens)
    assert g.tokens.count(tok.eos_id) <= 1
    assert g.tokens[-1] == tok.eos_id or len(g.tokens) - 1 == max_len
    assert len(g.tokens) - 1 <= max_len


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
                check_shape(tok, g, 12)
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
    for min_len, max_len in ((0, 10), (4, 7), (10, 14), (3, 3)):
        out = beam_search(model, frames, mask, tok, beam_size=1, min_len=min_len, max_len=max_len)
        for b, g in enumerate(out):
            s = int((~mask[b]).sum())
            ids, score = greedy_reference(model, frames[b : b + 1, :s], tok, min_len, max_len)
            assert g.tokens == ids
            assert g.score == pytest.approx(score, abs=1e-5)


def nll(model, frames, mask, tokens, pad_id):
    with torch.no_grad():
        return float(pair_loss(model, frames, mask, torch.tensor([tokens]), pad_id))


@pytest.mark.parametrize("beam", [1, 3, 5])
def test_score_is_the_mean_log_prob(tok, beam):
    """Without masks at work the score is -pair_loss of the tokens (the mean log-prob of
    words and eos, or of the max_len words of a cut caption); masks only renormalise over
    the allowed tokens, which raises it."""
    model = tiny_model(tok, seed=3)
    frames, mask = audio_batch([5, 2, 7, 4], seed=3)
    free = dict(min_len=0, forbid_repeats=False, ban_specials=False)
    cut = 0
    for max_len in (4, 9):
        for b, g in enumerate(beam_search(model, frames, mask, tok, beam, max_len=max_len, **free)):
            loss = nll(model, frames[b : b + 1], mask[b : b + 1], g.tokens, tok.pad_id)
            assert g.score == pytest.approx(-loss, abs=1e-5)
            cut += g.tokens[-1] != tok.eos_id
    assert cut  # a cut caption was scored too
    for b, g in enumerate(beam_search(model, frames, mask, tok, beam, min_len=2, max_len=9)):
        assert (
            -nll(model, frames[b : b + 1], mask[b : b + 1], g.tokens, tok.pad_id) <= g.score + 1e-6
        )
        assert g.score <= 0.0


def test_min_and_max_length(tok):
    frames, mask = audio_batch([5, 3, 6, 2], seed=4)
    for seed in range(2):
        model = tiny_model(tok, seed=seed, peaked=1.0)
        for min_len, max_len in ((3, 5), (6, 6), (0, 2), (0, 1)):
            for g in beam_search(
                model, frames, mask, tok, beam_size=3, min_len=min_len, max_len=max_len
            ):
                check_shape(tok, g, max_len)
                n = len(g.text.split())
                assert min_len <= n <= max_len, (min_len, max_len, g.text)
                assert n == len(g.tokens) - 1 - (g.tokens[-1] == tok.eos_id)
    for bad in ((5, 4), (0, 0), (-1, 3)):
        with pytest.raises(ValueError, match="min_len"):
            beam_search(model, frames, mask, tok, min_len=bad[0], max_len=bad[1])
    with pytest.raises(ValueError, match="input positions"):
        beam_search(model, frames, mask, tok, max_len=model.cfg.max_len + 1)


def test_eos_is_natural_when_allowed(tok):
    """With eos strongly favoured, captions end as soon as min_len allows."""
    model = tiny_model(tok, seed=5)
    with torch.no_grad():
        model.classifier.bias[tok.eos_id] = 50.0
    frames, mask = audio_batch([4, 6], seed=5)
    for min_len in (0, 3):
        for g in beam_search(model, frames, mask, tok, beam_size=3, min_len=min_len, max_len=10):
            assert len(g.tokens) - 2 == min_len


def test_stuck_hypothesis_ends_with_eos():
    """Every content word used, eos still forbidden by min_len: eos rather than a broken rule."""
    small = WordTokenizer.build(["dog car"])
    model = tiny_model(small, seed=8)
    frames, mask = audio_batch([3, 5], seed=8)
    for g in beam_search(model, frames, mask, small, beam_size=2, min_len=6, max_len=8):
        assert g.tokens[-1] == small.eos_id and len(g.tokens) <= 4, g.tokens
        assert torch.isfinite(torch.tensor(g.score))


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
