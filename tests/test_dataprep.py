"""dataprep end to end: demo set -> word2vec + small VAE -> encoding -> shards (the session's demo set, encoded in
this process), and real-data sources (img2dataset tar, COCO layout) with corrupt and empty inputs that must be
skipped, counted and listed while the rest lands, encoded on a real local Ray instance (Ray Data) and in this process
with the same result."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from dataprep import shapes
from dataprep.__main__ import main as dataprep_main
from psunet.autoencoder import Autoencoder
from psunet.data import ShardStream, load_manifest
from psunet.text import TextCodec, load_vectors
from conftest import DEMO_SAMPLES as SAMPLES, DEMO_SHARD_SIZE

def read_plain(folder):
    """Read a shard set back with plain webdataset, no project code."""
    manifest = json.loads((folder / "manifest.json").read_text())
    urls = [str(folder / name) for name in manifest["shards"]]
    samples = []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        samples.append({
            "key": sample["__key__"],
            "latent": np.load(io.BytesIO(sample["latent.npy"]), allow_pickle=False),
            "text": np.load(io.BytesIO(sample["text.npy"]), allow_pickle=False),
            "caption": sample["caption.txt"].decode(),
            "meta": json.loads(sample["json"]),
        })
    return manifest, samples


def test_demo_shards_have_the_documented_format(demo_set):
    train_manifest, train = read_plain(demo_set / "train")
    val_manifest, val = read_plain(demo_set / "val")
    assert len(train) == train_manifest["samples"] and len(val) == val_manifest["samples"]
    assert len(train) + len(val) == SAMPLES and len(val) > 20
    assert len(train_manifest["shards"]) == -(-len(train) // DEMO_SHARD_SIZE)
    keys = [s["key"] for s in train + val]
    assert len(set(keys)) == SAMPLES
    for sample in train[:20]:
        assert sample["latent"].dtype == np.float16 and sample["latent"].shape == (4, 8, 8)
        assert sample["text"].dtype == np.float16 and sample["text"].shape == (16, 16)
        index = int(sample["key"].rsplit("-", 1)[1])
        truth = shapes.sample_at(index, seed=0)
        assert sample["caption"] == truth.caption
        assert len(sample["meta"]["objects"]) == len(truth.objects)
    assert train_manifest["latent_shape"] == [4, 8, 8] and train_manifest["text_len"] == 16
    assert train_manifest["word_dim"] == 16 and train_manifest["skipped"] == []
    assert train_manifest["scaling_factor"] > 0


def test_text_vectors_decode_to_the_caption(demo_set):
    manifest = load_manifest(demo_set / "train")
    codec = TextCodec(load_vectors(demo_set / "train" / manifest.word_vectors, manifest.word_vectors_sha256), 16)
    _, train = read_plain(demo_set / "train")
    vectors = torch.from_numpy(np.stack([s["text"] for s in train[:50]]).astype(np.float32))
    assert codec.decode(vectors) == [s["caption"] for s in train[:50]]


def test_latents_decode_back_to_the_images(demo_set):
    """VAE round trip through the shards: stored latents decode close to the original pixels.

    Bound: MSE on [0, 1] pixels below 0.03 for this briefly trained VAE (200 steps), and clearly
    below the error of predicting the mean image.
    """
    manifest = load_manifest(demo_set / "train")
    vae = Autoencoder.load(manifest.resolve(demo_set / "train", manifest.autoencoder))
    assert vae.scaling_factor == pytest.approx(manifest.scaling_factor)
    _, train = read_plain(demo_set / "train")
    latents = torch.from_numpy(np.stack([s["latent"] for s in train[:64]]).astype(np.float32))
    originals = np.stack([shapes.sample_at(int(s["key"].rsplit("-", 1)[1]), seed=0).image for s in train[:64]])
    decoded = vae.decode(latents).permute(0, 2, 3, 1).numpy()
    target = originals.astype(np.float32) / 255
    mse = float(np.mean((decoded - target) ** 2))
    mean_image_mse = float(np.mean((target.mean(0, keepdims=True) - target) ** 2))
    assert mse < 0.03 and mse < 0.7 * mean_image_mse, (mse, mean_image_mse)
    # latents are scaled to roughly unit variance
    assert 0.3 < latents.std().item() < 3


def test_psunet_reader_streams_the_shards_and_refuses_a_mismatched_model(demo_set):
    from psunet.config import preset

    config = preset("tiny")
    stream = iter(ShardStream(demo_set / "train", config, training=True))
    sample = next(stream)
    assert sample["latent"].shape == config.latent_shape and sample["text"].shape == (16, 16)
    with pytest.raises(ValueError, match="word_dim: model has 32, shards have 16"):
        ShardStream(demo_set / "train", config.model_copy(update={"word_dim": 32}))


def jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).resize((48, 48)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def encode_with_demo_assets(source: str, demo_set, out, val_fraction: float = 0, encoder_actors: int = 0) -> int:
    """`dataprep encode` of a real-data source with the demo set's autoencoder and word vectors (in this process, or
    with that many Ray Data encoder actors); its exit code."""
    return dataprep_main(["encode", "--source", source, "--out", str(out), "--resolution", "32",
                          "--vae", str(demo_set / "vae"), "--word-vectors", str(demo_set / "words.bin"),
                          "--word-dim", "16", "--val-fraction", str(val_fraction),
                          "--encoder-actors", str(encoder_actors)])


@pytest.mark.ray
def test_real_sources_skip_and_report_bad_records_with_ray_data_as_in_process(demo_set, tmp_path):
    good = [shapes.sample_at(i, seed=5) for i in range(6)]
    tar_path = tmp_path / "part-000.tar"
    with tarfile.open(tar_path, "w") as tar:
        members = [member for i, s in enumerate(good[:4])
                   for member in ((f"{i:04d}.jpg", jpeg(s.image)), (f"{i:04d}.txt", s.caption.encode()))]
        members += [("0100.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"), ("0100.txt", good[4].caption.encode()),
                    ("0101.jpg", jpeg(good[5].image)), ("0101.txt", b"   "),
                    ("0102.jpg", jpeg(good[5].image)), ("0102.txt", b"zebra xylophone")]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "shards"
    assert encode_with_demo_assets(f"wds:{tar_path}", demo_set, out, encoder_actors=1) == 0
    manifest = load_manifest(out / "train")
    assert manifest.samples == 4
    reasons = {entry["key"]: entry["reason"] for entry in manifest.skipped}
    assert len(reasons) == 3 and manifest.stats["skipped_total"] == 3
    assert any("corrupt" in r for r in reasons.values())
    assert any("empty caption" in r for r in reasons.values())
    assert any("only unknown words" in r for r in reasons.values())
    _, samples = read_plain(out / "train")
    assert sorted(s["caption"] for s in samples) == sorted(s.caption for s in good[:4])

    # the same source encoded in this process: the same skips, the same samples
    assert encode_with_demo_assets(f"wds:{tar_path}", demo_set, tmp_path / "local") == 0
    assert load_manifest(tmp_path / "local" / "train").skipped == manifest.skipped
    local = {s["key"]: s for s in read_plain(tmp_path / "local" / "train")[1]}
    assert sorted(local) == sorted(s["key"] for s in samples)
    for sample in samples:
        np.testing.assert_allclose(local[sample["key"]]["latent"], sample["latent"], atol=2e-3)
        np.testing.assert_array_equal(local[sample["key"]]["text"], sample["text"])


def test_coco_layout_with_missing_and_corrupt_images(demo_set, tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    demo = [shapes.sample_at(i, seed=9) for i in range(3)]
    images = [{"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": 48, "height": 48} for i in range(4)]
    annotations = [{"id": 10 * i + j, "image_id": i + 1, "caption": demo[min(i, 2)].caption} for i in range(4)
                   for j in range(2)]
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": images,
                                                                             "annotations": annotations}))
    (root / "val2017" / images[0]["file_name"]).write_bytes(jpeg(demo[0].image))
    (root / "val2017" / images[1]["file_name"]).write_bytes(jpeg(demo[1].image))
    (root / "val2017" / images[2]["file_name"]).write_bytes(b"truncated")  # corrupt; image 4 is missing
    out = tmp_path / "shards"
    assert encode_with_demo_assets(f"coco:{root}", demo_set, out) == 0
    manifest = load_manifest(out / "train")
    assert manifest.samples == 4  # 2 good images x 2 captions
    reasons = [entry["reason"] for entry in manifest.skipped]
    assert len(reasons) == 4 and sum("corrupt" in r for r in reasons) == 2
    assert sum("missing" in r or "not found" in r for r in reasons) == 2


def coco_source(root, images: int, captions: int) -> tuple[str, dict[str, str]]:
    """A COCO-layout source of demo images with `captions` captions each; its spec and each key's image."""
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    entries = [{"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": 48, "height": 48} for i in range(images)]
    annotations = [{"id": 100 * i + j, "image_id": i + 1, "caption": shapes.sample_at(i + 50 * j, seed=3).caption}
                   for i in range(images) for j in range(captions)]
    (root / "annotations" / "captions_train2017.json").write_text(json.dumps({"images": entries,
                                                                               "annotations": annotations}))
    for i, entry in enumerate(entries):
        (root / "train2017" / entry["file_name"]).write_bytes(jpeg(shapes.sample_at(i, seed=3).image))
    return f"coco:{root}", {f"coco-{i + 1:012d}-{j}": entry["file_name"] for i, entry in enumerate(entries)
                            for j in range(captions)}


def folder_source(root, images: int, rows_per_image: int = 2) -> tuple[str, dict[str, str]]:
    """A folder index whose rows name each image `rows_per_image` times, spelled `img0.jpg` then `./img0.jpg`."""
    root.mkdir()
    rows, image_of = [], {}
    for i in range(images):
        (root / f"img{i}.jpg").write_bytes(jpeg(shapes.sample_at(i, seed=4).image))
        for j in range(rows_per_image):
            image_of[f"folder-{len(rows):09d}"] = f"img{i}.jpg"
            rows.append({"file": f"./img{i}.jpg" if j else f"img{i}.jpg",
                         "caption": shapes.sample_at(i + 50 * j, seed=4).caption})
    (root / "index.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return f"folder:{root}:index.jsonl", image_of


@pytest.mark.parametrize("make_source", [lambda root: coco_source(root, images=8, captions=3),
                                         lambda root: folder_source(root, images=6)], ids=["coco", "folder"])
def test_all_captions_of_one_image_land_on_one_side(demo_set, tmp_path, make_source):
    """Split by source image: a per-caption hash would put captions of one image on both sides here."""
    spec, image_of = make_source(tmp_path / "source")
    out = tmp_path / "shards"
    assert encode_with_demo_assets(spec, demo_set, out, val_fraction=0.5) == 0
    side = {split: {s["key"] for s in read_plain(out / split)[1]} for split in ("train", "val")}
    assert sorted(side["train"] | side["val"]) == sorted(image_of)
    images = {split: {image_of[key] for key in keys} for split, keys in side.items()}
    assert images["train"] and images["val"] and not images["train"] & images["val"]
    for split in side:
        assert load_manifest(out / split).stats["source_images"] == len(images[split])


@pytest.mark.parametrize("val_fraction, message", [
    (0.05, "the validation split is empty: --val-fraction 0.05 picked none of the 1 source images (2 samples); "
           "use more data, a larger --val-fraction, or --val-fraction 0 for no validation set"),
    (0.9, "the training split is empty: --val-fraction 0.9 picked all 1 source images (2 samples) for validation; "
          "use more data or a smaller --val-fraction"),
])
def test_a_split_that_leaves_a_side_empty_is_an_error(demo_set, tmp_path, capsys, val_fraction, message):
    spec, _ = folder_source(tmp_path / "source", images=1)
    assert encode_with_demo_assets(spec, demo_set, tmp_path / "shards", val_fraction=val_fraction) == 2
    assert f"dataprep: error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "shards" / "val" / "manifest.json").exists()


def test_missing_input_fails_at_once_with_a_clear_message(tmp_path, capsys):
    code = dataprep_main(["encode", "--source", f"coco:{tmp_path / 'nowhere'}", "--out", str(tmp_path / "o"),
                          "--vae", str(tmp_path), "--word-dim", "16", "--encoder-actors", "0"])
    assert code == 2
    assert "nowhere" in capsys.readouterr().err


def test_trained_word_vectors_are_whitened_so_words_of_one_kind_differ():
    from gensim.models import Word2Vec

    from dataprep.word2vec import train_word2vec
    from psunet.text import tokenize

    captions = [sample.caption for sample in shapes.generate(400, seed=0, max_objects=1)]
    colours = ["red", "green", "blue", "yellow", "cyan", "magenta"]

    def largest_cosine(vectors) -> float:
        unit = np.stack([vectors[c] / np.linalg.norm(vectors[c]) for c in colours])
        similarity = unit @ unit.T
        return float(similarity[~np.eye(len(colours), dtype=bool)].max())

    raw = Word2Vec([tokenize(c) for c in captions], vector_size=16, sg=1, seed=0, workers=1, epochs=20).wv
    whitened = train_word2vec(captions, 16)
    assert largest_cosine(raw) > 0.9  # templated captions: every colour word shares every context
    assert largest_cosine(whitened) < 0.8
    words = [w for w in whitened.index_to_key if not w.startswith("<")]
    table = np.stack([whitened[w] for w in words])
    assert np.abs(table.mean(0)).max() < 1e-4
    assert np.linalg.eigvalsh(np.cov(table.T, bias=True)).max() < 1.0 + 1e-4  # shrunk whitening: all <= 1
