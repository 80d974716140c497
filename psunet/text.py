"""Captions <-> fixed-length sequences of word vectors, around a gensim KeyedVectors.

A caption is split into lowercase words, each mapped to its word2vec vector, then padded to L
slots with an end/pad token that has its own vector. Vectors are unit-normalised and scaled by
sqrt(E) so that each element has variance ~1, like the scaled image latents. Words not in the
vocabulary map to an explicit unknown token and are reported. Decoding is a nearest-neighbour
(cosine) lookup over the whole vocabulary, done as one matrix product.

Word vectors are stored in the word2vec binary format (no pickle) with a sha256 checksum.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gensim.models import KeyedVectors

END = "<end>"
UNK = "<unk>"
BLANK = "[?]"
_WORD = re.compile(r"\[\?\]|[a-z0-9]+(?:'[a-z0-9]+)*")


def tokenize(caption: str) -> list[str]:
    """Lowercase words (and [?] blanks), punctuation dropped."""
    return _WORD.findall(caption.lower())


def add_special_tokens(vectors: KeyedVectors, seed: int = 0) -> KeyedVectors:
    """A copy of `vectors` in which END and UNK have their own random vectors (kept if present)."""
    missing = [token for token in (END, UNK) if token not in vectors.key_to_index]
    rng = np.random.default_rng(seed)
    keys = list(vectors.index_to_key) + missing
    table = np.concatenate([
        vectors.vectors.astype(np.float32),
        rng.standard_normal((len(missing), vectors.vector_size)).astype(np.float32),
    ])
    result = KeyedVectors(vectors.vector_size)
    result.add_vectors(keys, table)
    return result


def save_vectors(vectors: KeyedVectors, path: str | Path) -> str:
    """Write word2vec binary format; return the file's sha256."""
    vectors.save_word2vec_format(str(path), binary=True)
    return file_sha256(path)


def load_vectors(path: str | Path, sha256: str | None = None) -> KeyedVectors:
    """Read word2vec binary format, checking the checksum when one is given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"word vectors file not found: {path}")
    if sha256 is not None and file_sha256(path) != sha256:
        raise ValueError(f"word vectors {path}: sha256 {file_sha256(path)} does not match expected {sha256}")
    return KeyedVectors.load_word2vec_format(str(path), binary=True)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class EncodedText:
    vectors: torch.Tensor  # (B, L, E) float32
    known: torch.Tensor  # (B, L) bool: False only at [?] blanks
    lengths: list[int]  # words per caption, end token excluded
    unknown: list[list[str]]  # out-of-vocabulary words per caption


def nearest_ids(vectors: torch.Tensor, unit_table: torch.Tensor) -> torch.Tensor:
    """(..., E) vectors -> (...) indices of the nearest rows of `unit_table` (V, E, each row of norm 1) by cosine
    similarity: how every text vector is read as a word."""
    unit = torch.nn.functional.normalize(vectors.float(), dim=-1)
    return (unit @ unit_table.to(unit.device).T).argmax(-1)


class TextCodec:
    def __init__(self, vectors: KeyedVectors, length: int):
        if length < 1:
            raise ValueError(f"text_len must be >= 1, got {length}")
        self.keyed_vectors = add_special_tokens(vectors)
        self.length = length
        self.dim = vectors.vector_size
        self.vocab: list[str] = list(self.keyed_vectors.index_to_key)
        unit = self.keyed_vectors.vectors / np.linalg.norm(self.keyed_vectors.vectors, axis=1, keepdims=True)
        self.unit_table = torch.from_numpy(unit.astype(np.float32))  # (V, E)
        self.table = self.unit_table * self.dim**0.5
        self.end_id = self.keyed_vectors.key_to_index[END]
        self.unk_id = self.keyed_vectors.key_to_index[UNK]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def token_ids(self, caption: str) -> tuple[list[int], list[str], list[bool]]:
        """Ids (blanks as END placeholders), unknown words, and known flags for one caption."""
        words = tokenize(caption)
        if len(words) + 1 > self.length:
            raise ValueError(
                f"text_len: caption has {len(words)} words, more than text_len - 1 = {self.length - 1} "
                f"(one slot is kept for the end token): {caption!r}"
            )
        ids, unknown, known = [], [], []
        for word in words:
            if word == BLANK:
                ids.append(self.end_id)
                known.append(False)
                continue
            index = self.keyed_vectors.key_to_index.get(word)
            if index is None or word in (END, UNK):
                unknown.append(word)
                index = self.unk_id
            ids.append(index)
            known.append(True)
        pad = self.length - len(ids)
        return ids + [self.end_id] * pad, unknown, known + [True] * pad

    def encode(self, captions: list[str]) -> EncodedText:
        ids, unknown, known, lengths = [], [], [], []
        for caption in captions:
            caption_ids, caption_unknown, caption_known = self.token_ids(caption)
            ids.append(caption_ids)
            unknown.append(caption_unknown)
            known.append(caption_known)
            lengths.append(len(tokenize(caption)))
        vectors = self.table[torch.tensor(ids, dtype=torch.long)]
        return EncodedText(vectors, torch.tensor(known, dtype=torch.bool), lengths, unknown)

    def nearest_ids(self, vectors: torch.Tensor) -> torch.Tensor:
        """(B, L, E) -> (B, L) ids of the nearest vocabulary vectors by cosine similarity."""
        return nearest_ids(vectors, self.unit_table)

    def decode(self, vectors: torch.Tensor) -> list[str]:
        """Nearest-neighbour words, cut at the first end token."""
        captions = []
        for row in self.nearest_ids(vectors).tolist():
            words = []
            for index in row:
                if index == self.end_id:
                    break
                words.append(self.vocab[index])
            captions.append(" ".join(words))
        return captions
