"""Shard manifest and streaming reader: rank splitting, endless resampling, refusal of mismatched shards."""

import json
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds

from psunet.config import preset
from psunet.data import (BadData, BadDataError, Manifest, ShardStream, collate, encode_sample, load_manifest,
                         make_loader, write_manifest)

CONFIG = preset("tiny")


def write_shards(folder, shard_sizes, corrupt_last=False):
    folder.mkdir(parents=True, exist_ok=True)
    names, index = [], 0
    for shard, size in enumerate(shard_sizes):
        name = f"train-{shard:06d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for _ in range(size):
                latent = np.full(CONFIG.latent_shape, index, np.float32)
                text = np.full((CONFIG.text_len, CONFIG.word_dim), -index, np.float32)
                sink.write(encode_sample(f"s{index:05d}", latent, text, f"caption {index}", {"i": index}))
                index += 1
        names.append(name)
    if corrupt_last:
        path = folder / names[-1]
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    write_manifest(folder, Manifest(
        autoencoder="../vae", autoencoder_is_local=True, scaling_factor=1.0, resolution=16,
        latent_shape=CONFIG.latent_shape, word_vectors="../words.bin", word_vectors_sha256="0" * 64,
        text_len=CONFIG.text_len, word_dim=CONFIG.word_dim, samples=index, shards=names))
    return index


def test_validation_pass_reads_every_sample_once_with_dtypes_and_shapes(tmp_path):
    total = write_shards(tmp_path, [5, 5, 3])
    samples = list(ShardStream(tmp_path, CONFIG, training=False))
    assert sorted(s["key"] for s in samples) == [f"s{i:05d}" for i in range(total)]
    first = samples[0]
    assert first["latent"].shape == CONFIG.latent_shape and first["latent"].dtype == torch.float32
    assert first["text"].shape == (CONFIG.text_len, CONFIG.word_dim)
    index = int(first["key"][1:])
    assert first["latent"][0, 0, 0].item() == index and first["text"][0, 0].item() == -index
    assert first["caption"] == f"caption {index}"


def test_ranks_split_shards_and_cover_all_in_validation(tmp_path):
    total = write_shards(tmp_path, [4, 4, 4])  # 3 shards over 2 ranks: uneven on purpose
    keys = [{s["key"] for s in ShardStream(tmp_path, training=False, rank=r, world_size=2)} for r in range(2)]
    assert keys[0].isdisjoint(keys[1]) and len(keys[0] | keys[1]) == total
    assert len(keys[0]) == 8 and len(keys[1]) == 4


def test_training_stream_never_ends_on_uneven_shards(tmp_path):
    write_shards(tmp_path, [3, 3, 3])
    for rank in range(2):
        loader = iter(torch.utils.data.DataLoader(
            ShardStream(tmp_path, training=True, rank=rank, world_size=2, shuffle_buffer=4),
            batch_size=4, collate_fn=collate))
        batches = [next(loader) for _ in range(20)]  # far more than one pass over the share
        assert all(b["latent"].shape == (4, *CONFIG.latent_shape) for b in batches)


def test_more_ranks_than_shards_still_trains(tmp_path):
    write_shards(tmp_path, [3])
    stream = iter(ShardStream(tmp_path, training=True, rank=3, world_size=4, shuffle_buffer=2))
    assert len([next(stream) for _ in range(10)]) == 10


def test_seeded_training_order_is_reproducible(tmp_path):
    write_shards(tmp_path, [6, 6])

    def keys(seed):
        stream = iter(ShardStream(tmp_path, training=True, seed=seed, shuffle_buffer=5))
        return [next(stream)["key"] for _ in range(15)]

    assert keys(1) == keys(1) and keys(1) != keys(2)


def test_dataloader_workers_split_the_share(tmp_path):
    total = write_shards(tmp_path, [4, 4, 4, 4])
    loader = make_loader(tmp_path, batch_size=2, training=False, num_workers=2)
    keys = [k for batch in loader for k in batch["key"]]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == total


def test_corrupt_tar_is_skipped_and_counted(tmp_path):
    write_shards(tmp_path, [5, 5], corrupt_last=True)
    stream = ShardStream(tmp_path, training=False)
    samples = list(stream)
    assert 5 <= len(samples) < 10
    assert stream.errors and any("tar" in e.lower() or "read" in e.lower() or "eof" in e.lower() for e in stream.errors)


def test_mismatched_model_is_refused_naming_the_fields(tmp_path):
    write_shards(tmp_path, [2])
    wrong = CONFIG.model_copy(update={"text_len": CONFIG.text_len + 1, "word_dim": 8})
    with pytest.raises(ValueError, match="text_len.*word_dim"):
        ShardStream(tmp_path, wrong)


def test_missing_or_unreadable_manifest_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "psunet-shards/1", "samples": "many"}))
    with pytest.raises(ValueError, match="unreadable shard manifest"):
        load_manifest(tmp_path)


def test_training_skips_a_shard_cut_at_a_member_edge_and_a_record_that_does_not_decode_and_notes_both(tmp_path):
    write_shards(tmp_path, [6, 6, 6])
    cut = tmp_path / "train-000001.tar"
    with tarfile.open(cut) as tar:
        edge = next(m.offset for m in tar.getmembers() if m.name.startswith("s00009."))
    with cut.open("r+b") as tar:  # at a member's header: tarfile reads it as a shorter archive, not a broken one
        tar.truncate(edge)
    broken = tmp_path / "train-000002.tar"
    with wds.TarWriter(str(broken)) as sink:
        sink.write({"__key__": "bad", "latent.npy": b"not an array", "text.npy": b"", "caption.txt": b"x",
                    "json": b"{}"})
    loader = make_loader(tmp_path, batch_size=4, training=True, seed=0, rank=0, world_size=1, shuffle_buffer=4)
    batches = [batch for batch, _ in zip(loader, range(40))]
    notes = [note for batch in batches for note in batch["bad"]]
    assert {n["shard"] for n in notes} == {str(cut.resolve()), str(broken.resolve())}
    assert any("truncated" in n["reason"] for n in notes if n["shard"] == str(cut.resolve()))
    assert [n["key"] for n in notes if "key" in n] and all(n["key"] == "bad" for n in notes if "key" in n)
    assert sum(1 for n in notes if n["shard"] == str(cut.resolve())) == 1  # not drawn again
    assert all(len(batch["key"]) == len(batch["latent"]) <= 4 for batch in batches)


def test_bad_data_counts_shards_and_records_once_and_stops_past_its_fraction():
    bad = BadData(shards=10, max_fraction=0.2)
    assert bad.metrics() == {}
    new = bad.add([{"shard": "a.tar", "reason": "EOFError", "key": "k1"}, {"shard": "a.tar", "reason": "x", "key": "k1"}])
    assert [n["shard"] for n in new] == ["a.tar"] and len(bad.records) == 1
    bad.add([{"shard": "b.tar", "reason": "ReadError"}])
    assert bad.metrics() == {"bad_shards": 2, "bad_records": 1}
    assert bad.state() == {"shards": {"a.tar": "EOFError", "b.tar": "ReadError"}, "records": ["a.tar#k1"]}
    with pytest.raises(BadDataError, match=r"3 of 10 shards .* data.max_bad_fraction=0.2 allows: a.tar: EOFError; "
                                           r"b.tar: ReadError; c.tar: boom"):
        bad.add([{"shard": "c.tar", "reason": "boom"}])
    assert BadData(10, 0.2, bad.state()).state() == bad.state()  # resumed from a checkpoint's record
