"""Normalisation, the word vocabulary, and the packaged stopword list."""

import pytest
import torch
from tokenizers import Tokenizer

from aacray.text import STOPWORDS, WordTokenizer, normalize, words

CAPTIONS = [
    "A dog barks, then a car passes by.",
    "A dog barks loudly!",
    "Rain falls on a tin roof; a dog barks.",
    "Birds chirp while the wind blows.",
]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A Dog's bark!", "a dogs bark"),
        ("  Hello,\tWORLD...\n  again  ", "hello world again"),
        ("high-pitched «beeps» — twice", "highpitched beeps twice"),
        ("Café’s “quiet” hum", "cafés quiet hum"),
        ("$5 + 3 = 8 | ~", "5 3 8"),
        ("", ""),
        ("!!!", ""),
    ],
)
def test_normalize(raw, expected):
    assert normalize(raw) == expected
    assert normalize(normalize(raw)) == normalize(raw)


def test_build_min_freq_and_special_ids():
    tok = WordTokenizer.build(CAPTIONS, min_freq=2)
    assert [tok.id_to_token(i) for i in range(4)] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    # counts: a 5, dog 3, barks 3, every other word once
    assert tok.itos[4:] == ["a", "barks", "dog"]
    assert tok.vocab_size == len(tok) == 7
    full = WordTokenizer.build(CAPTIONS, min_freq=1)
    assert full.vocab_size == 4 + len({w for c in CAPTIONS for w in words(c)})
    assert full.itos[4] == "a"  # most frequent first
    with pytest.raises(ValueError, match="min_freq"):
        WordTokenizer.build(CAPTIONS, min_freq=0)


def test_encode_decode_roundtrip():
    tok = WordTokenizer.build(CAPTIONS)
    for c in CAPTIONS:
        ids = tok.encode(c)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.unk_id not in ids
        assert len(ids) == len(words(c)) + 2
        assert tok.decode(ids) == normalize(c)
        assert tok.decode(torch.tensor(ids)) == normalize(c)


def test_decode_stops_at_eos_and_drops_specials():
    tok = WordTokenizer.build(CAPTIONS)
    a, dog = tok.token_to_id("a"), tok.token_to_id("dog")
    assert tok.decode([tok.bos_id, a, tok.unk_id, dog, tok.eos_id, a, dog]) == "a dog"
    assert tok.decode([a, tok.pad_id, dog]) == "a dog"
    assert tok.decode([]) == ""


def test_oov():
    tok = WordTokenizer.build(CAPTIONS)
    assert tok.oov_count("A dog barks") == 0
    assert tok.oov_count("A zebra and a unicorn bark!") == 4  # zebra and unicorn bark
    ids = tok.encode("a zebra barks")
    assert ids == [
        tok.bos_id,
        tok.token_to_id("a"),
        tok.unk_id,
        tok.token_to_id("barks"),
        tok.eos_id,
    ]
    assert tok.oov_count("") == 0


def test_encode_batch_padding_and_max_len():
    tok = WordTokenizer.build(CAPTIONS)
    texts = ["a dog", "a dog barks loudly", ""]
    tokens, lengths = tok.encode_batch(texts)
    assert tokens.dtype == torch.long and lengths.tolist() == [4, 6, 2]
    assert tokens.shape == (3, 6)
    for i, t in enumerate(texts):
        assert tokens[i, : lengths[i]].tolist() == tok.encode(t)
        assert (tokens[i, lengths[i] :] == tok.pad_id).all()
    short, short_len = tok.encode_batch(texts, max_len=4)
    assert short.shape == (3, 4) and short_len.tolist() == [4, 4, 2]
    assert short[1].tolist() == tok.encode("a dog barks loudly")[:3] + [tok.eos_id]
    with pytest.raises(ValueError):
        tok.encode_batch(texts, max_len=1)


def test_save_load_and_str_roundtrip(tmp_path):
    tok = WordTokenizer.build(CAPTIONS)
    probes = CAPTIONS + ["An unknown ZEBRA, and a dog!", "", "dog dog dog"]
    path = tok.save(tmp_path / "tokenizer.json")
    assert path.name == "tokenizer.json"
    loaded = WordTokenizer.load(path)
    loaded_dir = WordTokenizer.load(tmp_path)
    again = WordTokenizer.from_str(tok.to_str())
    for other in (loaded, loaded_dir, again):
        assert other.itos == tok.itos
        for p in probes:
            assert other.encode(p) == tok.encode(p)
        torch.testing.assert_close(other.encode_batch(probes)[0], tok.encode_batch(probes)[0])
    # The tokenizer.json alone (plain `tokenizers`, no aacray normalize) agrees too.
    raw = Tokenizer.from_file(str(path))
    for p in probes:
        assert raw.encode(p).ids == tok.encode(p)


def test_load_rejects_wrong_special_ids():
    from tokenizers.models import WordLevel

    bad = Tokenizer(WordLevel({"<unk>": 0, "<pad>": 1, "<bos>": 2, "<eos>": 3}, unk_token="<unk>"))
    with pytest.raises(ValueError, match="<pad>"):
        WordTokenizer.from_str(bad.to_str())


def test_stopwords():
    assert isinstance(STOPWORDS, frozenset)
    assert len(STOPWORDS) == 179
    for w in ("a", "the", "and", "before", "after", "while", "then", "not", "don't", "wouldn"):
        assert w in STOPWORDS
    for w in ("dog", "car", "rain", "followed"):
        assert w not in STOPWORDS
