"""Encoding at scale with Ray Data: records -> (image latents, caption word vectors) -> WebDataset shards.

    units of work ──flat_map (CPU tasks)──> decoded, resized images + cleaned captions
                  ──map_batches (actor pool: one autoencoder + word vectors per actor, GPU if asked)──>
                  latents + word vectors ──driver──> train/val shards + manifest

A unit is a small JSON-able dict (a range of demo samples, one tar URL, or a chunk of records
with image paths), so reading happens in the tasks, not on the driver. A record that cannot be
used (corrupt image, empty or over-long caption, only unknown words, too-small image) becomes a
row with a `skip` reason: it is counted and listed in the manifest, never silently dropped.

Train and val are split by source image (`is_validation` of the row's `image_key`), so every
caption of one image lands on the same side. With `encoder_actors=0` the same functions run one after the
other in this process, without Ray (small sets, a laptop, the tests).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import ray
import torch
import webdataset as wds

from dataprep import readers, shapes
from psunet.autoencoder import Autoencoder
from psunet.data import Manifest, encode_sample, write_manifest
from psunet.progress import progress
from psunet.text import TextCodec, load_vectors

RECORDS_PER_UNIT = 256


@dataclasses.dataclass
class EncodeSettings:
    out_dir: str
    resolution: int
    text_len: int
    autoencoder: str  # hub id or local folder
    word_vectors: str  # word2vec binary file, inside out_dir
    word_vectors_sha256: str
    samples_per_shard: int = 1000
    val_fraction: float = 0.05
    batch_size: int = 64
    encoder_actors: int = 1  # 0: encode in this process, without Ray
    use_gpu: bool = False

    def __post_init__(self):
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.encoder_actors < 0:
            raise ValueError(f"encoder_actors must be >= 0 (0: in this process), got {self.encoder_actors}")


def demo_units(samples: int, seed: int, resolution: int, max_objects: int = 2, scene: str = "objects",
               per_unit: int = RECORDS_PER_UNIT) -> list[dict]:
    """Units of `per_unit` consecutive demo samples (see dataprep.shapes.sample_at for the arguments)."""
    return [{"kind": "demo", "start": start, "stop": min(start + per_unit, samples), "seed": seed, "size": resolution,
             "max_objects": max_objects, "scene": scene}
            for start in range(0, samples, per_unit)]


def source_units(spec: str, skipped: list[dict]) -> list[dict]:
    """Units for a reader spec (see dataprep.readers.open_source); records skipped while listing go to `skipped`."""
    kind = spec.partition(":")[0]
    if kind in ("wds", "webdataset"):
        from braceexpand import braceexpand

        readers.open_source(spec)  # fails at once on a missing path
        return [{"kind": "wds", "url": url} for url in braceexpand(spec.partition(":")[2])]
    units, chunk = [], []
    for item in readers.open_source(spec):
        if isinstance(item, readers.SkippedRecord):
            skipped.append({"key": item.key, "reason": item.reason})
            continue
        chunk.append(dataclasses.asdict(item))
        if len(chunk) == RECORDS_PER_UNIT:
            units.append({"kind": "records", "records": chunk})
            chunk = []
    if chunk:
        units.append({"kind": "records", "records": chunk})
    return units


def source_captions(spec: str) -> Iterator[str]:
    """Every usable caption of a source, for training word2vec before encoding."""
    for item in readers.open_source(spec):
        if isinstance(item, readers.RawRecord):
            try:
                yield readers.clean_caption(item.caption)
            except readers.Skip:
                continue


def unit_records(unit: dict) -> Iterator[readers.RawRecord | readers.SkippedRecord | shapes.DemoSample]:
    """A work unit's records: generated demo samples, a WebDataset shard's, or the raw records it lists."""
    if unit["kind"] == "demo":
        for index in range(unit["start"], unit["stop"]):
            yield shapes.sample_at(index, seed=unit["seed"], size=unit["size"], max_objects=unit["max_objects"],
                                   scene=unit["scene"])
    elif unit["kind"] == "wds":
        yield from readers.read_webdataset(unit["url"])
    else:
        for record in unit["records"]:
            yield readers.RawRecord(**record)


def unit_size(unit: dict) -> int | None:
    """How many records a work unit holds; None for a WebDataset shard (not known before reading it)."""
    if unit["kind"] == "demo":
        return unit["stop"] - unit["start"]
    return len(unit["records"]) if unit["kind"] == "records" else None


def load_rows(unit: dict, resolution: int) -> Iterator[dict]:
    """Ray Data flat_map: one row per record, with a decoded image or a skip reason.

    `image_key` names the row's source image (a demo sample is its own image; skipped rows have none).
    """
    blank = np.zeros((resolution, resolution, 3), np.uint8)
    for record in unit_records(unit):
        row = {"key": record.key, "image_key": "", "caption": "", "image": blank, "skip": "", "meta": "{}"}
        if isinstance(record, readers.SkippedRecord):
            yield {**row, "skip": record.reason}
            continue
        if isinstance(record, shapes.DemoSample):
            objects = [dataclasses.asdict(obj) for obj in record.objects]
            yield {**row, "image_key": record.key, "caption": record.caption, "image": record.image,
                   "meta": json.dumps({"objects": objects})}
            continue
        try:
            caption = readers.clean_caption(record.caption)
            image = readers.load_image(record, resolution)
        except readers.Skip as exc:
            yield {**row, "skip": str(exc)}
            continue
        yield {**row, "image_key": record.image_key, "caption": caption, "image": image,
               "meta": json.dumps(record.meta, default=str)}


class Encoder:
    """Ray Data actor: one autoencoder and one word-vector codec, loaded once per actor."""

    def __init__(self, autoencoder: str, word_vectors: str, word_vectors_sha256: str, text_len: int, use_gpu: bool):
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        self.autoencoder = Autoencoder.load(autoencoder, device=device, dtype=dtype)
        self.codec = TextCodec(load_vectors(word_vectors, word_vectors_sha256), text_len)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        skip = [str(reason) for reason in batch["skip"]]
        texts = np.zeros((len(skip), self.codec.length, self.codec.dim), np.float16)
        unknown = np.zeros(len(skip), np.int32)
        for i, caption in enumerate(batch["caption"]):
            if skip[i]:
                continue
            try:
                encoded = self.codec.encode([str(caption)])
            except ValueError:
                skip[i] = f"caption longer than text_len - 1 = {self.codec.length - 1} words"
                continue
            if encoded.unknown[0] and len(encoded.unknown[0]) == encoded.lengths[0]:
                skip[i] = "caption has only unknown words"
                continue
            texts[i] = encoded.vectors[0].numpy().astype(np.float16)
            unknown[i] = len(encoded.unknown[0])
        latents = self.autoencoder.encode(torch.from_numpy(np.array(batch["image"], copy=True)))
        return {"key": batch["key"], "image_key": batch["image_key"], "caption": batch["caption"],
                "meta": batch["meta"], "skip": np.array(skip),
                "latent": latents.float().cpu().numpy().astype(np.float16), "text": texts, "unknown": unknown}


def is_validation(image_key: str, fraction: float) -> bool:
    """Whether a source image goes to val: a hash of its key, so all its captions land on one side
    and re-encoding puts every image on the same side."""
    return zlib.crc32(image_key.encode()) % 10_000 < fraction * 10_000


def encoded_batches(units: list[dict], settings: EncodeSettings) -> Iterator[dict[str, np.ndarray]]:
    """The units' rows, encoded (Encoder's output) in batches of settings.batch_size: by a Ray Data pipeline, or
    in this process when settings.encoder_actors is 0 (small sets; no Ray started)."""
    encoder_args = dict(autoencoder=settings.autoencoder, word_vectors=settings.word_vectors,
                        word_vectors_sha256=settings.word_vectors_sha256, text_len=settings.text_len,
                        use_gpu=settings.use_gpu)
    if settings.encoder_actors == 0:
        encoder = Encoder(**encoder_args)
        rows = (row for unit in units for row in load_rows(unit, settings.resolution))
        while chunk := list(itertools.islice(rows, settings.batch_size)):
            yield encoder({key: np.array([row[key] for row in chunk]) for key in chunk[0]})
        return
    dataset = (
        ray.data.from_items(units, override_num_blocks=len(units))
        .flat_map(load_rows, fn_kwargs={"resolution": settings.resolution})
        .map_batches(
            Encoder,
            fn_constructor_kwargs=encoder_args,
            batch_size=settings.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=settings.encoder_actors),
            num_gpus=1 if settings.use_gpu else 0,
        )
    )
    yield from dataset.iter_batches(batch_size=settings.batch_size, batch_format="numpy")


def build_shards(units: list[dict], settings: EncodeSettings, scaling_factor: float,
                 skipped: list[dict] | None = None, autoencoder_is_local: bool = True, log=print) -> dict[str, Manifest]:
    """Encode the units (encoded_batches) and write `train/` and `val/` shard sets with their manifests.

    Raises ValueError when every record is skipped, or when a side would be empty: val (with
    val_fraction > 0; val_fraction 0 means no validation samples) or train.
    """
    if not units:
        raise ValueError("nothing to encode: the source has no records")
    out = Path(settings.out_dir)
    started = time.perf_counter()
    images = {"train": set(), "val": set()}  # source image keys per side
    writers, counts = {}, {"train": 0, "val": 0}
    skipped = list(skipped or [])
    unknown_words = 0
    latent_shape = None
    for split in images:
        (out / split).mkdir(parents=True, exist_ok=True)
        # a whole-second mtime: a fractional one makes tarfile add a PAX header to every member, which
        # doubles the headers the reader parses (and a fixed one makes the shards reproducible)
        writers[split] = wds.ShardWriter(str(out / split / f"{split}-%06d.tar"), maxcount=settings.samples_per_shard,
                                         verbose=0, mtime=0)
    sizes = [unit_size(unit) for unit in units]
    bar = progress(total=None if None in sizes else sum(sizes), desc="encode", unit="samples")
    try:
        for batch in encoded_batches(units, settings):
            for i, key in enumerate(batch["key"]):
                key = str(key)
                if batch["skip"][i]:
                    skipped.append({"key": key, "reason": str(batch["skip"][i])})
                    continue
                image_key = str(batch["image_key"][i])
                split = "val" if is_validation(image_key, settings.val_fraction) else "train"
                images[split].add(image_key)
                latent_shape = tuple(int(n) for n in batch["latent"][i].shape)
                writers[split].write(encode_sample(key, batch["latent"][i], batch["text"][i], str(batch["caption"][i]),
                                                   json.loads(str(batch["meta"][i]))))
                counts[split] += 1
                unknown_words += int(batch["unknown"][i])
            bar.update(len(batch["key"]))
    finally:
        bar.close()
        for writer in writers.values():
            writer.close()
    elapsed = time.perf_counter() - started
    if latent_shape is None:
        raise ValueError(f"every record was skipped ({len(skipped)}); first reasons: "
                         f"{[s['reason'] for s in skipped[:3]]}")
    if settings.val_fraction > 0 and not counts["val"]:
        raise ValueError(f"the validation split is empty: --val-fraction {settings.val_fraction} picked none of the "
                         f"{len(images['train'])} source images ({counts['train']} samples); use more data, "
                         f"a larger --val-fraction, or --val-fraction 0 for no validation set")
    if not counts["train"]:
        raise ValueError(f"the training split is empty: --val-fraction {settings.val_fraction} picked all "
                         f"{len(images['val'])} source images ({counts['val']} samples) for validation; "
                         f"use more data or a smaller --val-fraction")

    manifests = {}
    for split in images:
        folder = out / split
        shards = sorted(path.name for path in folder.glob(f"{split}-*.tar"))
        manifest = Manifest(
            autoencoder=_relative_to(settings.autoencoder, folder) if autoencoder_is_local else settings.autoencoder,
            autoencoder_is_local=autoencoder_is_local, scaling_factor=scaling_factor,
            resolution=settings.resolution, latent_shape=latent_shape,
            word_vectors=_relative_to(settings.word_vectors, folder), word_vectors_sha256=settings.word_vectors_sha256,
            text_len=settings.text_len, word_dim=int(load_vectors(settings.word_vectors).vector_size),
            samples=counts[split], shards=shards,
            skipped=skipped if split == "train" else [],
            stats={"source_images": len(images[split]), "unknown_words": unknown_words,
                   "skipped_total": len(skipped), "encode_seconds": round(elapsed, 2),
                   "samples_per_second": round(sum(counts.values()) / elapsed, 1)},
        )
        write_manifest(folder, manifest)
        manifests[split] = manifest
    total = sum(counts.values())
    log(f"dataprep: wrote {counts['train']} train + {counts['val']} val samples "
        f"(of {len(images['train'])} + {len(images['val'])} source images, "
        f"{len(manifests['train'].shards)} + {len(manifests['val'].shards)} shards), skipped {len(skipped)}, "
        f"in {elapsed:.1f} s ({total / elapsed:.1f} samples/s) -> {out}")
    return manifests


def _relative_to(path: str, folder: Path) -> str:
    return os.path.relpath(Path(path).resolve(), folder.resolve())
