"""word2vec codec: round trips, padding, scale, unknown words, blanks, checksummed storage."""

import pytest
import torch

from psunet.text import BLANK, END, UNK, TextCodec, file_sha256, load_vectors, save_vectors, tokenize


@pytest.fixture(scope="module")
def codec(word_vectors):
    return TextCodec(word_vectors, length=16)


def test_round_trip_returns_the_original_words(codec):
    from tests.conftest import CAPTIONS
    encoded = codec.encode(CAPTIONS)
    assert encoded.vectors.shape == (len(CAPTIONS), 16, 16) and encoded.vectors.dtype == torch.float32
    assert codec.decode(encoded.vectors) == CAPTIONS
    # decoding tolerates noise: it is a nearest-neighbour lookup
    assert codec.decode(encoded.vectors + 0.05 * torch.randn_like(encoded.vectors)) == CAPTIONS


def test_padding_uses_the_end_vector_and_scale_matches_latents(codec):
    encoded = codec.encode(["a red circle"])
    end = codec.table[codec.end_id]
    assert all(torch.equal(encoded.vectors[0, i], end) for i in range(3, 16))
    norms = encoded.vectors.norm(dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, 16**0.5))
    assert abs(encoded.vectors.pow(2).mean().item() - 1.0) < 1e-4
    assert encoded.lengths == [3] and encoded.known.all()


def test_unknown_words_are_reported_and_mapped_to_unk(codec):
    encoded = codec.encode(["a purple circle", "a red circle"])
    assert encoded.unknown == [["purple"], []]
    assert torch.equal(encoded.vectors[0, 1], codec.table[codec.unk_id])
    assert codec.decode(encoded.vectors)[0] == f"a {UNK} circle"


def test_blanks_are_marked_unknown(codec):
    encoded = codec.encode([f"a {BLANK} circle on the {BLANK}"])
    assert encoded.known[0, :6].tolist() == [True, False, True, True, True, False]
    assert encoded.known[0, 6:].all()


def test_too_long_caption_names_text_len(codec):
    with pytest.raises(ValueError, match="text_len"):
        codec.encode([" ".join(["red"] * 16)])


def test_tokenize():
    assert tokenize("A Small, RED circle!  on the left's side") == ["a", "small", "red", "circle", "on", "the",
                                                                      "left's", "side"]
    assert tokenize("a [?] circle") == ["a", "[?]", "circle"]


def test_vectors_save_and_load_with_checksum(tmp_path, codec):
    path = tmp_path / "words.bin"
    digest = save_vectors(codec.keyed_vectors, path)
    assert digest == file_sha256(path)
    loaded = load_vectors(path, sha256=digest)
    assert END in loaded.key_to_index and loaded.vector_size == 16
    assert TextCodec(loaded, 16).decode(codec.encode(["a big green triangle"]).vectors) == ["a big green triangle"]
    with pytest.raises(ValueError, match="sha256"):
        load_vectors(path, sha256="0" * 64)
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        load_vectors(tmp_path / "missing.bin")
