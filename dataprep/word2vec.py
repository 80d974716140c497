"""Caption embeddings: train a gensim Word2Vec on a data set's captions, or load given vectors."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from gensim.models import KeyedVectors, Word2Vec

from psunet.text import add_special_tokens, load_vectors, save_vectors, tokenize


def train_word2vec(captions: Iterable[str], vector_size: int, seed: int = 0, epochs: int = 20,
                   window: int = 5, min_count: int = 1) -> KeyedVectors:
    """Word2Vec (skip-gram) on the captions; single-threaded so that a seed gives the same vectors."""
    sentences = [tokenize(caption) for caption in captions]
    sentences = [words for words in sentences if words]
    if not sentences:
        raise ValueError("word2vec: no non-empty captions to train on")
    model = Word2Vec(sentences, vector_size=vector_size, window=window, min_count=min_count, sg=1,
                     seed=seed, workers=1, epochs=epochs)
    return add_special_tokens(model.wv, seed=seed)


def prepare_word_vectors(captions: Iterable[str] | None, out_path: str | Path, vector_size: int,
                         given: str | None = None, seed: int = 0) -> tuple[KeyedVectors, str]:
    """Train on the captions (or load `given`, a word2vec binary file), save next to the shards.

    Returns the vectors as saved and the saved file's sha256.
    """
    if given is not None:
        vectors = add_special_tokens(load_vectors(given))
        if vectors.vector_size != vector_size:
            raise ValueError(f"word_dim: {given} has {vectors.vector_size}-d vectors, config asks for {vector_size}")
    else:
        vectors = train_word2vec(captions or [], vector_size, seed=seed)
    digest = save_vectors(vectors, out_path)
    return vectors, digest
