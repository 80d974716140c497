"""Caption embeddings: train a gensim Word2Vec on a data set's captions, or load given vectors.

Vectors trained on a small caption set are whitened before they are saved. Word2vec places words
that occur in the same contexts close together, and in templated captions every colour (or shape,
or size) word shares all its contexts: their vectors come out with cosine ~0.99, which leaves the
diffusion model almost no signal to tell "red" from "blue" once a little noise is added. Shrunk ZCA
whitening over the vocabulary (covariance + eps * mean eigenvalue) spreads those words apart
(cosine ~0.3-0.5) while keeping each category's shared direction.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from gensim.models import KeyedVectors, Word2Vec

from psunet.text import add_special_tokens, load_vectors, save_vectors, tokenize


def whiten(vectors: KeyedVectors, shrinkage: float = 1e-2) -> KeyedVectors:
    """The same words with centred, shrunk-ZCA-whitened vectors (see the module docstring)."""
    table = vectors.vectors.astype(np.float64)
    centred = table - table.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred / len(centred))
    eigenvalues = np.clip(eigenvalues, 0.0, None) + shrinkage * max(eigenvalues.mean(), 1e-12)
    whitened = centred @ (eigenvectors * eigenvalues**-0.5) @ eigenvectors.T
    result = KeyedVectors(vectors.vector_size)
    result.add_vectors(list(vectors.index_to_key), whitened.astype(np.float32))
    return result


def train_word2vec(captions: Iterable[str], vector_size: int, seed: int = 0, epochs: int = 20,
                   window: int = 5, min_count: int = 1) -> KeyedVectors:
    """Whitened Word2Vec (skip-gram) vectors of the captions, special tokens added.

    Single-threaded so that a seed gives the same vectors.
    """
    sentences = [tokenize(caption) for caption in captions]
    sentences = [words for words in sentences if words]
    if not sentences:
        raise ValueError("word2vec: no non-empty captions to train on")
    model = Word2Vec(sentences, vector_size=vector_size, window=window, min_count=min_count, sg=1,
                     seed=seed, workers=1, epochs=epochs)
    return add_special_tokens(whiten(model.wv), seed=seed)


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
