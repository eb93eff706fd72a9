"""Caption normalisation, the word-level vocabulary, and the NLTK English stopwords.

Choices worth knowing:
- `normalize` lowercases, *deletes* punctuation (paper 3.1: "all punctuation characters
  are removed"), so "dog's" -> "dogs" and "high-pitched" -> "highpitched", and collapses
  whitespace to single spaces. Punctuation is every Unicode P* character plus the ASCII
  symbols of `string.punctuation` ($ + < = > ^ ` | ~), which Unicode files under S*.
- The vocabulary is a HuggingFace `tokenizers` WordLevel model: `<pad>`, `<bos>`,
  `<eos>`, `<unk>` hold ids 0..3, then words by descending training frequency (ties
  alphabetical), so a build is deterministic. Python `normalize` runs before every
  encode; the tokenizer.json also carries an equivalent normaliser (for outside users)
  and a `<bos> $A <eos>` post-processor, so `encode` returns bos ... eos.
- `STOPWORDS` is the classic 179-word `nltk.corpus.stopwords.words("english")` list,
  shipped as package data because nothing can be downloaded at run time. Its
  apostrophe forms ("don't") never survive `normalize`; the bare forms ("don") do.
"""

from __future__ import annotations

import importlib.resources
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3

# ASCII characters of string.punctuation that Unicode classes as symbols (S*), not P*.
_ASCII_SYMBOLS = frozenset(
    c for c in string.punctuation if not unicodedata.category(c).startswith("P")
)


def _load_stopwords() -> frozenset[str]:
    text = (
        importlib.resources.files("aacray")
        .joinpath("data/nltk_english_stopwords.txt")
        .read_text(encoding="utf-8")
    )
    return frozenset(w.strip() for w in text.splitlines() if w.strip())


STOPWORDS: frozenset[str] = _load_stopwords()


def _is_punct(c: str) -> bool:
    return c in _ASCII_SYMBOLS or unicodedata.category(c).startswith("P")


def normalize(text: str) -> str:
    """Lowercase, delete punctuation, collapse whitespace: "A Dog's bark!" -> "a dogs bark"."""
    text = "".join(c for c in text.lower() if not _is_punct(c))
    return " ".join(text.split())


def words(text: str) -> list[str]:
    """The words of `normalize(text)`."""
    return normalize(text).split()


def _hf_normalizer() -> normalizers.Normalizer:
    symbols = "".join("\\" + c for c in sorted(_ASCII_SYMBOLS))
    return normalizers.Sequence(
        [
            normalizers.Lowercase(),
            normalizers.Replace(Regex(f"[\\p{{P}}{symbols}]"), ""),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip(),
        ]
    )


class WordTokenizer:
    """Word-level vocabulary with pad/bos/eos/unk = 0/1/2/3, backed by `tokenizers`."""

    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 3

    def __init__(self, tokenizer: Tokenizer) -> None:
        for i, tok in enumerate(SPECIAL_TOKENS):
            got = tokenizer.token_to_id(tok)
            if got != i:
                raise ValueError(f"special token {tok!r} must have id {i}, got {got}")
        self._tok = tokenizer
        self._vocab: dict[str, int] = tokenizer.get_vocab()
        self._itos: list[str] = [""] * len(self._vocab)
        for w, i in self._vocab.items():
            self._itos[i] = w

    # --- construction -----------------------------------------------------------------
    @classmethod
    def build(cls, texts: Iterable[str], min_freq: int = 1) -> WordTokenizer:
        """Vocabulary of the words seen at least `min_freq` times in `texts` (normalised)."""
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        counts = Counter(w for t in texts for w in words(t))
        for (
            tok
        ) in SPECIAL_TOKENS:  # a caption could literally contain "<unk>"; "<" is removed anyway
            counts.pop(tok, None)
        kept = sorted(
            (w for w, n in counts.items() if n >= min_freq), key=lambda w: (-counts[w], w)
        )
        vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
        vocab.update({w: i + len(SPECIAL_TOKENS) for i, w in enumerate(kept)})
        tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
        tok.normalizer = _hf_normalizer()
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", special_tokens=[(BOS, 1), (EOS, 2)]
        )
        return cls(tok)

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

    def oov_count(self, text: str) -> int:
        """How many words of `text` map to `<unk>`."""
        return sum(w not in self._vocab for w in words(text))

    # --- encoding -----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """[bos, w1, ..., wn, eos]; unknown words become unk."""
        return self._tok.encode(normalize(text)).ids

    def encode_batch(
        self, texts: Sequence[str], max_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded token ids (B, T) long and lengths (B,) long (bos and eos included).

        T is the longest sequence in the batch. With `max_len`, a longer sequence keeps its
        first max_len - 1 tokens and ends with eos (so it still holds bos ... eos).
        """
        if max_len is not None and max_len < 2:
            raise ValueError(f"max_len must be >= 2 (bos + eos), got {max_len}")
        encs = [e.ids for e in self._tok.encode_batch([normalize(t) for t in texts])]
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
        """Words up to the first eos; pad, bos and unk are dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id, self.unk_id):
                continue
            out.append(self._itos[i])
        return " ".join(out)
