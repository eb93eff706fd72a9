"""Caption normalisation, the word-level vocabulary, and the NLTK English stopwords.

Choices worth knowing:
- Two normalisers, told apart by `version` (NORMALIZER_VERSION = 2 for new vocabularies).
  A WordTokenizer knows which one its vocabulary was built with (from the normaliser in its
  tokenizer.json) and always encodes with that one, so a checkpoint keeps encoding as it was
  trained.
- Version 2 is the authors' (conette 0.3.2's AACTokenizer defaults, checked against it in
  tests/test_conette_parity.py): drop the literal tokens <pad> <bos> <eos> <unk>; map
  “ ” -> ", ` ’ -> ', ; -> ",", … -> "...", & -> " & "; lowercase; replace each of
  , . ! ? ; : " “ ” ’ ` ( ) { } [ ] * × - # / + _ ~ ʘ \\ by a space (the apostrophe stays);
  collapse spaces; strip. Words are then split with spaCy's English tokenizer rules
  ("man's" -> "man 's", "doesn't" -> "does n't", "dont" -> "do nt", "gonna" -> "gon na",
  "3pm" -> "3 pm", "10kg" -> "10 kg", "dogs'" -> "dogs '"), reproduced here without spaCy:
  its exception table, its prefix/suffix loop and its special-case merge pass, for the
  characters that survive the step before when they are letters, digits and apostrophes
  (tests compare with spaCy 3.8 on every such exception and on random strings). Known
  differences, all rare in captions: symbols that spaCy splits off ($5 -> "$ 5",
  50% -> "50 %", a=b, «x», °, emoji) stay attached here; a tab or newline inside a
  caption is a separator here, a token of its own for conette.
- Version 1 (vocabularies built before): lowercase, *delete* punctuation (every Unicode P*
  character plus the ASCII symbols $ + < = > ^ ` | ~), collapse whitespace:
  "high-pitched" -> "highpitched", "dog's" -> "dogs".
- The vocabulary is a HuggingFace `tokenizers` WordLevel model: `<pad>`, `<bos>`,
  `<eos>`, `<unk>` hold ids 0..3, then words by descending training frequency (ties
  alphabetical), so a build is deterministic. Python `normalize` runs before every
  encode; the tokenizer.json carries the character steps of its version as its
  normaliser (and a `<bos> $A <eos>` post-processor, so `encode` returns bos ... eos). For
  version 1 that is the whole rule; for version 2 the spaCy-style word splitting exists
  only in Python, so a user of the tokenizer.json alone must run `aacray.text.normalize`
  first (as WordTokenizer.encode does), or "doesn't" stays one (unknown) word.
- `STOPWORDS` is the classic 179-word `nltk.corpus.stopwords.words("english")` list,
  shipped as package data because nothing can be downloaded at run time.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
BOS_ID = 1
NORMALIZER_VERSION = 2
"""The normaliser of new vocabularies; a loaded tokenizer.json keeps its own."""
NORMALIZER_VERSIONS = (1, 2)


def _load_stopwords() -> frozenset[str]:
    text = (
        importlib.resources.files("aacray")
        .joinpath("data/nltk_english_stopwords.txt")
        .read_text(encoding="utf-8")
    )
    return frozenset(w.strip() for w in text.splitlines() if w.strip())


STOPWORDS: frozenset[str] = _load_stopwords()


# --- version 1: delete punctuation ------------------------------------------------------
# ASCII characters of string.punctuation that Unicode classes as symbols (S*), not P*.
_ASCII_SYMBOLS = frozenset(
    c for c in string.punctuation if not unicodedata.category(c).startswith("P")
)


def _is_punct(c: str) -> bool:
    return c in _ASCII_SYMBOLS or unicodedata.category(c).startswith("P")


def _normalize_v1(text: str) -> str:
    text = "".join(c for c in text.lower() if not _is_punct(c))
    return " ".join(text.split())


# --- version 2, characters: conette's pre-encoding normalisers --------------------------
_SPECIALS_RE = re.compile("<pad>|<bos>|<eos>|<unk>")
_RARE_PUNCT = (
    ("“", '"'),
    ("”", '"'),
    ("`", "'"),
    ("’", "'"),
    (";", ","),
    ("…", "..."),
    ("&", " & "),
)
_TO_SPACE = ',.!?;:"“”’`(){}[]*×-#/+_~ʘ\\'
# One pattern for Python's re and the tokenizers (Oniguruma) Replace: ASCII escaped.
_TO_SPACE_CLASS = "[" + "".join("\\" + c if c.isascii() else c for c in _TO_SPACE) + "]"
_TO_SPACE_RE = re.compile(_TO_SPACE_CLASS)


def _clean_chars_v2(text: str) -> str:
    text = _SPECIALS_RE.sub("", text)
    for a, b in _RARE_PUNCT:
        text = text.replace(a, b)
    text = _TO_SPACE_RE.sub(" ", text.lower())
    return re.sub(" +", " ", text).strip()


# --- version 2, words: spaCy's English tokenizer rules ----------------------------------
_D_LL = ("'d", "'d 've", "'ll", "'ll 've")
_PRONOUN_CLITICS = {
    "i": ("'m", "'m a", "'ve"),
    **dict.fromkeys(("you", "we", "they", "these", "those"), ("'re", "'ve")),
    **dict.fromkeys(("he", "she", "it", "that", "this"), ("'s",)),
    **dict.fromkeys(("there", "what", "when", "where", "who", "why", "how"), ("'re", "'s", "'ve")),
}
_NT_VE = "ca could did does do had may might must need ought sha should wo would".split()
_NT = "ai are dare has have is was were".split()
_MODAL_VE = "could might must should would not".split()
# Apostrophe-less forms spaCy leaves alone because they are words.
_NOT_BARE = frozenset("ill its hell shed shell well were whore howdy".split())
_KEEP_WHOLE = (
    "' '' 'bout 'cause 'cos 'coz 'cuz 'd 'em 'll 'nuff 're 's doin' goin' havin' lovin' "
    "nothin' nuthin' somethin' ol' ma'am o'clock"
).split()
_UNITS = "km m dm cm mm ha µm nm yd in ft kg g mg µg t lb oz kmh mph mbar mb kb gb tb".split()
_SUFFIX_RE = re.compile("(?:'s|'|(?<=[0-9])(?:" + "|".join(_UNITS) + "))$")


@cache
def _exceptions() -> dict[str, tuple[str, ...]]:
    """spaCy's English special cases over [a-z0-9']: chunk -> its tokens."""
    out: dict[str, tuple[str, ...]] = {}

    def add(tokens: str, bare: bool = True) -> None:
        toks = tuple(tokens.split())
        out["".join(toks)] = toks
        plain = tuple(t.replace("'", "") for t in toks)
        if bare and "".join(plain) not in _NOT_BARE:
            out["".join(plain)] = plain

    for base, clitics in _PRONOUN_CLITICS.items():
        for c in _D_LL + clitics:
            add(f"{base} {c}")
    add("how 'd 'y")
    for v in _NT_VE + _NT:
        add(f"{v} n't")
    for v in _NT_VE:
        add(f"{v} n't 've")
    for v in _MODAL_VE:
        add(f"{v} 've")
    for t in ("let 's", "can not", "gon na", "got ta", "c'm on"):
        add(t, bare=False)
    add("y' all")
    for h in range(1, 13):
        add(f"{h} am")
        add(f"{h} pm")
    for w in _KEEP_WHOLE:
        add(w, bare=False)
    return out


def _affix_split(s: str, specials: dict) -> tuple[list[str], str, list[str]]:
    """spaCy's prefix/suffix loop on one chunk: (prefixes, middle, suffixes reversed)."""
    pre: list[str] = []
    suf: list[str] = []
    last = -1
    while s and len(s) != last:
        if s in specials:
            break
        last = len(s)
        p = 1 if s.startswith("'") else 0  # the only prefix over [a-z0-9']: a quote
        if p and s[p:] in specials:
            pre.append(s[:p])
            s = s[p:]
            break
        m = _SUFFIX_RE.search(s[p:])
        n = m.end() - m.start() if m else 0
        if n and s[:-n] in specials:
            suf.append(s[-n:])
            s = s[:-n]
            break
        if p and n and p + n <= len(s):
            pre.append(s[:p])
            suf.append(s[-n:])
            s = s[p:-n]
        elif p:
            pre.append(s[:p])
            s = s[p:]
        elif n:
            suf.append(s[-n:])
            s = s[:-n]
    return pre, s, suf


def _chunk_tokens(chunk: str, specials: dict) -> list[str]:
    if chunk in specials:
        return list(specials[chunk])
    pre, mid, suf = _affix_split(chunk, specials)
    middle = list(specials.get(mid, (mid,))) if mid else []
    return pre + middle + suf[::-1]


@cache
def _merge_patterns() -> dict[tuple[str, ...], str]:
    """spaCy's second pass: the tokens a special case with affixes is first split into
    (without special cases) -> that special case."""
    exc = _exceptions()
    return {
        tuple(_chunk_tokens(k, {})): k for k in exc if k.startswith("'") or _SUFFIX_RE.search(k)
    }


def _merge_specials(tokens: list[str], chunk_of: list[int]) -> list[str]:
    """Re-merge token runs that spell a special case, choosing runs as spaCy does (longest
    first, then leftmost; a run is dropped if one of its ends is taken). A run across a
    space is chosen like any other but left as it is."""
    runs = []
    for pat, key in _merge_patterns().items():
        n = len(pat)
        for i in range(len(tokens) - n + 1):
            if tuple(tokens[i : i + n]) == pat:
                runs.append((i, i + n, key))
    runs.sort(key=lambda r: (r[0] - r[1], r[0]))
    seen: set[int] = set()
    chosen = []
    for start, end, key in runs:
        if start not in seen and end - 1 not in seen:
            chosen.append((start, end, key))
        seen.update(range(start, end))
    out, i, exc = [], 0, _exceptions()
    for start, end, key in sorted(chosen):
        out += tokens[i:start]
        same_chunk = chunk_of[start] == chunk_of[end - 1]
        out += list(exc[key]) if same_chunk else tokens[start:end]
        i = end
    return out + tokens[i:]


def _split_words_v2(text: str) -> list[str]:
    specials = _exceptions()
    tokens: list[str] = []
    chunk_of: list[int] = []
    for j, chunk in enumerate(text.split()):
        toks = _chunk_tokens(chunk, specials)
        tokens += toks
        chunk_of += [j] * len(toks)
    if any("'" in t for t in tokens):  # every merge pattern holds an apostrophe
        tokens = _merge_specials(tokens, chunk_of)
    return tokens


# --- the public rule --------------------------------------------------------------------
def _check_version(version: int) -> None:
    if version not in NORMALIZER_VERSIONS:
        raise ValueError(
            f"normaliser version must be one of {NORMALIZER_VERSIONS}, got {version!r}"
        )


def normalize(text: str, version: int = NORMALIZER_VERSION) -> str:
    """The caption's words joined by single spaces.

    version 2: "A Dog's high-pitched bark!" -> "a dog 's high pitched bark";
    version 1: the same -> "a dogs highpitched bark".
    """
    _check_version(version)
    if version == 1:
        return _normalize_v1(text)
    return " ".join(_split_words_v2(_clean_chars_v2(text)))


def words(text: str, version: int = NORMALIZER_VERSION) -> list[str]:
    """The words of `normalize(text, version)`."""
    return normalize(text, version).split()


def _hf_normalizer(version: int) -> normalizers.Normalizer:
    """The character steps of `version` as a `tokenizers` normaliser (for tokenizer.json)."""
    _check_version(version)
    if version == 1:
        symbols = "".join("\\" + c for c in sorted(_ASCII_SYMBOLS))
        steps = [
            normalizers.Lowercase(),
            normalizers.Replace(Regex(f"[\\p{{P}}{symbols}]"), ""),
            normalizers.Replace(Regex(r"\s+"), " "),
        ]
    else:
        steps = [
            normalizers.Replace(Regex(_SPECIALS_RE.pattern), ""),
            *(normalizers.Replace(a, b) for a, b in _RARE_PUNCT),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(_TO_SPACE_CLASS), " "),
            normalizers.Replace(Regex(" +"), " "),
        ]
    return normalizers.Sequence([*steps, normalizers.Strip()])


@cache
def _hf_normalizer_json(version: int) -> str:
    tok = Tokenizer(WordLevel(vocab={UNK: 0}, unk_token=UNK))
    tok.normalizer = _hf_normalizer(version)
    return json.dumps(json.loads(tok.to_str())["normalizer"], sort_keys=True)


def normalizer_version_of(tokenizer: Tokenizer) -> int:
    """Which aacray normaliser a tokenizer.json carries (1 for files made before versions)."""
    got = json.dumps(json.loads(tokenizer.to_str())["normalizer"], sort_keys=True)
    for v in NORMALIZER_VERSIONS:
        if got == _hf_normalizer_json(v):
            return v
    raise ValueError(
        f"tokenizer.json has a normaliser that is none of aacray's versions {NORMALIZER_VERSIONS}: "
        f"{got[:200]}"
    )


def is_task_token(token: str) -> bool:
    """A CoNeTTE task token (`<bos_clotho>`, `<bos_audiocaps>`, ...): a caption start, never a word."""
    return token.startswith("<bos_") and token.endswith(">")


class WordTokenizer:
    """Word-level vocabulary with pad/bos/eos/unk = 0/1/2/3, backed by `tokenizers`.

    The token every caption starts with is the post-processor's (`bos_id`): `<bos>` for
    aacray's vocabularies, a task token (`<bos_clotho>`, ...) for a CoNeTTE vocabulary loaded
    for that task (aacray/conette_model.py), so encoding, scoring and beam search need no
    task argument. `stopwords` are the words beam search lets repeat (NLTK's list, or the
    ones a CoNeTTE folder's forbid_rep_mask lets repeat).
    """

    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 3

    def __init__(self, tokenizer: Tokenizer, stopwords: Iterable[str] = STOPWORDS) -> None:
        for i, tok in enumerate(SPECIAL_TOKENS):
            got = tokenizer.token_to_id(tok)
            if got != i:
                raise ValueError(f"special token {tok!r} must have id {i}, got {got}")
        self._tok = tokenizer
        self.normalizer_version: int = normalizer_version_of(tokenizer)
        """The `normalize` version this vocabulary was built with (and encodes with)."""
        self._vocab: dict[str, int] = tokenizer.get_vocab()
        self._itos: list[str] = [""] * len(self._vocab)
        for w, i in self._vocab.items():
            self._itos[i] = w
        ends = tokenizer.encode("").ids  # [start token, eos] from the post-processor
        if len(ends) != 2 or ends[1] != self.eos_id or not (ends[0] == BOS_ID or is_task_token(self._itos[ends[0]])):
            raise ValueError(f"the post-processor must give [<bos> or a task token, <eos>], got {ends}")
        self.bos_id = ends[0]
        self.stopwords = frozenset(stopwords)
        self.special_ids: tuple[int, ...] = tuple(
            i for i, w in enumerate(self._itos) if i in (self.pad_id, BOS_ID, self.unk_id) or is_task_token(w)
        )
        """Ids that are never words: pad, bos, unk and every task token (decode drops them)."""

    # --- construction -----------------------------------------------------------------
    @classmethod
    def build(
        cls, texts: Iterable[str], min_freq: int = 1, normalizer_version: int = NORMALIZER_VERSION
    ) -> WordTokenizer:
        """Vocabulary of the words seen at least `min_freq` times in `texts` (normalised)."""
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        _check_version(normalizer_version)
        counts = Counter(w for t in texts for w in words(t, normalizer_version))
        for tok in SPECIAL_TOKENS:  # never a word (neither version lets one through anyway)
            counts.pop(tok, None)
        kept = sorted(
            (w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w)
        )
        vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
        vocab.update({w: i + len(SPECIAL_TOKENS) for i, w in enumerate(kept)})
        return cls.from_vocab(vocab, normalizer_version=normalizer_version)

    @classmethod
    def from_vocab(
        cls,
        vocab: dict[str, int],
        bos: str = BOS,
        normalizer_version: int = NORMALIZER_VERSION,
        stopwords: Iterable[str] = STOPWORDS,
    ) -> WordTokenizer:
        """A tokenizer over `vocab` (token -> id; specials at 0..3) whose captions start with
        `bos` (`<bos>`, or a task token of the vocabulary)."""
        if bos not in vocab:
            raise ValueError(f"start token {bos!r} is not in the vocabulary")
        tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
        tok.normalizer = _hf_normalizer(normalizer_version)
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {EOS}", special_tokens=[(bos, vocab[bos]), (EOS, vocab[EOS])]
        )
        return cls(tok, stopwords)

    @classmethod
    def from_str(cls, s: str) -> WordTokenizer:
        return cls(Tokenizer.from_str(s))

    def to_str(self) -> str:
        return self._tok.to_str()

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        """Read a tokenizer.json (a file path, or a folder holding tokenizer.json)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        return cls.from_str(path.read_text(encoding="utf-8"))

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json (to `path`, or into `path` if it is a folder). Returns the file."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        path.write_text(self.to_str(), encoding="utf-8")
        return path

    # --- vocabulary ---------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._vocab.get(token)

    def id_to_token(self, i: int) -> str:
        return self._itos[i]

    @property
    def itos(self) -> list[str]:
        """Tokens in id order (a copy)."""
        return list(self._itos)

    def normalize(self, text: str) -> str:
        """`normalize` with this vocabulary's version."""
        return normalize(text, self.normalizer_version)

    def words(self, text: str) -> list[str]:
        """`words` with this vocabulary's version."""
        return words(text, self.normalizer_version)

    def oov_count(self, text: str) -> int:
        """How many words of `text` map to `<unk>`."""
        return sum(w not in self._vocab for w in self.words(text))

    # --- encoding -----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """[bos, w1, ..., wn, eos]; unknown words become unk."""
        return self._tok.encode(self.normalize(text)).ids

    def encode_batch(
        self, texts: Sequence[str], max_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded token ids (B, T) long and lengths (B,) long (bos and eos included).

        T is the longest sequence in the batch. With `max_len`, a longer sequence keeps its
        first max_len - 1 tokens and ends with eos (so it still holds bos ... eos).
        """
        if max_len is not None and max_len < 2:
            raise ValueError(f"max_len must be >= 2 (bos + eos), got {max_len}")
        encs = [e.ids for e in self._tok.encode_batch([self.normalize(t) for t in texts])]
        if max_len is not None:
            encs = [
                ids if len(ids) <= max_len else ids[: max_len - 1] + [self.eos_id] for ids in encs
            ]
        lengths = torch.tensor([len(ids) for ids in encs], dtype=torch.long)
        T = int(lengths.max()) if len(encs) else 0
        tokens = torch.full((len(encs), T), self.pad_id, dtype=torch.long)
        for i, ids in enumerate(encs):
            tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return tokens, lengths

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Words up to the first eos; pad, bos, unk and task tokens (`special_ids`) are dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            if i in self.special_ids:
                continue
            out.append(self._itos[i])
        return " ".join(out)
