"""Normalisation, the word vocabulary, and the packaged stopword list."""

import pytest
import torch
from tokenizers import Tokenizer

from aacray.text import NORMALIZER_VERSION, STOPWORDS, WordTokenizer, normalize, words

CAPTIONS = [
    "A dog barks, then a car passes by.",
    "A dog barks loudly!",
    "Rain falls on a tin roof; a dog barks.",
    "Birds chirp while the wind blows.",
]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A Dog's bark!", "a dog 's bark"),
        ("  Hello,\tWORLD...\n  again  ", "hello world again"),
        ("high-pitched beeps -- twice", "high pitched beeps twice"),
        ("Café’s “quiet” hum", "café 's quiet hum"),
        ("It doesn't stop; they're gonna go", "it does n't stop they 're gon na go"),
        ("A 10kg drop at 3pm, the birds' song", "a 10 kg drop at 3 pm the birds ' song"),
        ("a <unk> word & more", "a word & more"),
        ("", ""),
        ("!!!", ""),
    ],
)
def test_normalize(raw, expected):
    assert normalize(raw) == normalize(raw, version=2) == expected
    assert normalize(normalize(raw)) == normalize(raw)
    assert words(raw) == expected.split()


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
def test_normalize_version_1(raw, expected):
    """The rule of vocabularies built before version 2: punctuation deleted."""
    assert normalize(raw, version=1) == expected
    assert normalize(normalize(raw, version=1), version=1) == normalize(raw, version=1)


def test_unknown_version():
    with pytest.raises(ValueError, match="version"):
        normalize("a dog", version=3)
    with pytest.raises(ValueError, match="version"):
        WordTokenizer.build(CAPTIONS, normalizer_version=0)


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
    # The tokenizer.json alone (plain `tokenizers`, no aacray normalize) agrees where no
    # word needs spaCy-style splitting; where one does, it must be normalised first.
    raw = Tokenizer.from_file(str(path))
    for p in probes:
        assert raw.encode(p).ids == tok.encode(p)
        assert raw.encode(normalize(p)).ids == tok.encode(p)
    split = "A dog's bark"
    assert raw.encode(normalize(split)).ids == tok.encode(split) != raw.encode(split).ids


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


# --- normaliser versions: old vocabularies keep encoding as they were trained ------------
# tokenizer.json written by aacray before normaliser versions existed (punctuation deleted),
# built from V1_CAPTIONS; V1_IDS is what it encoded V1_PROBE to then.
V1_TOKENIZER_JSON = '{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":{"type":"Sequence","normalizers":[{"type":"Lowercase"},{"type":"Replace","pattern":{"Regex":"[\\\\p{P}\\\\$\\\\+\\\\<\\\\=\\\\>\\\\^\\\\`\\\\|\\\\~]"},"content":""},{"type":"Replace","pattern":{"Regex":"\\\\s+"},"content":" "},{"type":"Strip","strip_left":true,"strip_right":true}]},"pre_tokenizer":{"type":"WhitespaceSplit"},"post_processor":{"type":"TemplateProcessing","single":[{"SpecialToken":{"id":"<bos>","type_id":0}},{"Sequence":{"id":"A","type_id":0}},{"SpecialToken":{"id":"<eos>","type_id":0}}],"pair":[{"Sequence":{"id":"A","type_id":0}},{"Sequence":{"id":"B","type_id":1}}],"special_tokens":{"<bos>":{"id":"<bos>","ids":[1],"tokens":["<bos>"]},"<eos>":{"id":"<eos>","ids":[2],"tokens":["<eos>"]}}},"decoder":null,"model":{"type":"WordLevel","vocab":{"<pad>":0,"<bos>":1,"<eos>":2,"<unk>":3,"a":4,"bark":5,"barks":6,"doesnt":7,"dog":8,"dogs":9,"highpitched":10,"it":11,"mans":12,"stop":13,"the":14,"voice":15},"unk_token":"<unk>"}}'
V1_CAPTIONS = ["A high-pitched dog's bark!", "The man's voice; it doesn't stop.", "a dog barks"]
V1_PROBE = "A high-pitched dog's bark, it doesn't"
V1_IDS = [1, 4, 10, 9, 5, 11, 7, 2]  # a highpitched dogs bark it doesnt


def test_new_vocabularies_use_version_2():
    tok = WordTokenizer.build(V1_CAPTIONS)
    assert tok.normalizer_version == NORMALIZER_VERSION == 2
    assert {"high", "pitched", "'s", "does", "n't"} <= set(tok.itos)
    assert tok.decode(tok.encode(V1_PROBE)) == "a high pitched dog 's bark it does n't"
    assert WordTokenizer.from_str(tok.to_str()).normalizer_version == 2


def test_old_tokenizer_json_keeps_version_1():
    old = WordTokenizer.from_str(V1_TOKENIZER_JSON)
    assert old.normalizer_version == 1
    assert old.encode(V1_PROBE) == V1_IDS
    assert old.encode_batch([V1_PROBE])[0][0].tolist() == V1_IDS
    assert old.oov_count("a high-pitched dog's bark") == 0
    assert old.words("Dog's") == ["dogs"] and old.normalize("high-pitched") == "highpitched"
    # building with version 1 still writes exactly that file
    assert WordTokenizer.build(V1_CAPTIONS, normalizer_version=1).to_str() == V1_TOKENIZER_JSON


def test_old_checkpoint_loads_and_encodes_as_trained(tmp_path):
    from aacray import checkpoint
    from aacray.decoder import CaptionDecoder, DecoderConfig

    old = WordTokenizer.from_str(V1_TOKENIZER_JSON)
    cfg = DecoderConfig(emb_dim=8, d_model=8, n_layers=1, n_heads=2, d_ff=16, max_len=8)
    checkpoint.save(str(tmp_path), CaptionDecoder(cfg, old.vocab_size), old, "{}\n", epoch=1)
    _, tok, _ = checkpoint.load(str(tmp_path))
    assert tok.normalizer_version == 1 and tok.encode(V1_PROBE) == V1_IDS


def test_unknown_normalizer_is_refused():
    from tokenizers import normalizers

    tok = Tokenizer.from_str(V1_TOKENIZER_JSON)
    tok.normalizer = normalizers.Lowercase()
    with pytest.raises(ValueError, match="none of aacray's versions"):
        WordTokenizer.from_str(tok.to_str())
