"""Training shards: the manifest that describes a shard set, and a streaming reader for it.

A shard set is a folder of WebDataset tars (one sample per caption-image pair: `latent.npy`
float16 C×H×W already scaled, `text.npy` float16 L×E, `caption.txt`, `json`) plus `manifest.json`
naming the autoencoder, its scaling factor, the word vectors and their checksum, L, E, the
latent shape, the sample count, the shard list and what was skipped while building it.

The reader is a torch IterableDataset that splits shards by rank and DataLoader worker, and in
training mode resamples shards forever, so every rank yields as many batches as it is asked for
(no DDP hang on uneven shards); the training loop counts steps. Nothing is unpickled.

A record or shard found corrupt while training (a truncated tar, a record that does not decode) is
skipped: it travels down the stream as a note in the batch's "bad" list (the batch is that much
smaller; the training loop tops it up), a shard that fails is not drawn again, and BadData counts what
was skipped and stops the run once more than a set fraction of the shards are bad.
"""

from __future__ import annotations

import io
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from psunet.config import ModelConfig

MANIFEST = "manifest.json"
FORMAT = "psunet-shards/1"


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT
    autoencoder: str = Field(description="hub id, or a folder relative to the manifest")
    autoencoder_is_local: bool
    scaling_factor: float
    resolution: int
    latent_shape: tuple[int, int, int]
    word_vectors: str = Field(description="word2vec binary file, relative to the manifest")
    word_vectors_sha256: str
    text_len: int
    word_dim: int
    samples: int
    shards: list[str]
    skipped: list[dict] = Field(default_factory=list, description="{key, reason} per skipped record")
    stats: dict = Field(default_factory=dict)

    def resolve(self, folder: str | Path, name: str) -> str:
        """A path in the manifest, made absolute against the manifest's folder."""
        return str((Path(folder) / name).resolve())

    def check_model(self, config: ModelConfig) -> None:
        """Refuse a model config that does not fit these shards, naming every mismatch."""
        wanted = {"latent_shape": tuple(config.latent_shape), "text_len": config.text_len, "word_dim": config.word_dim}
        found = {"latent_shape": tuple(self.latent_shape), "text_len": self.text_len, "word_dim": self.word_dim}
        problems = [f"{key}: model has {wanted[key]}, shards have {found[key]}"
                    for key in wanted if wanted[key] != found[key]]
        if problems:
            raise ValueError("shards do not match the model config: " + "; ".join(problems))


def load_manifest(folder: str | Path) -> Manifest:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no shard manifest at {path}")
    try:
        manifest = Manifest.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise ValueError(f"unreadable shard manifest {path}: {exc}") from exc
    if manifest.format != FORMAT:
        raise ValueError(f"shard manifest {path}: format {manifest.format!r}, expected {FORMAT!r}")
    return manifest


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    path = Path(folder) / MANIFEST
    path.write_text(manifest.model_dump_json(indent=2))
    return path


def encode_sample(key: str, latent: np.ndarray, text: np.ndarray, caption: str, meta: dict) -> dict:
    """One WebDataset sample dict in the shard format."""
    def npy(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array.astype(np.float16), allow_pickle=False)
        return buffer.getvalue()

    return {"__key__": key, "latent.npy": npy(latent), "text.npy": npy(text),
            "caption.txt": caption.encode(), "json": json.dumps(meta).encode()}


def _load_npy(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))


def decode_sample(sample: dict) -> dict:
    return {"key": sample["__key__"], "latent": _load_npy(sample["latent.npy"]),
            "text": _load_npy(sample["text.npy"]), "caption": sample["caption.txt"].decode()}


def _rank_and_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ShardStream(torch.utils.data.IterableDataset):
    """Samples from a shard set as dicts {key, latent (C,H,W), text (L,E), caption}.

    training=True: endless, shards drawn at random (with replacement) from this rank's and this
    DataLoader worker's share, samples shuffled in a buffer. training=False: one ordered pass over
    the share, for validation. Broken samples or tars are skipped and counted in `self.errors`
    (per process).
    """

    def __init__(self, folder: str | Path, model_config: ModelConfig | None = None, training: bool = True,
                 seed: int = 0, shuffle_buffer: int = 1000, rank: int | None = None, world_size: int | None = None):
        self.folder = Path(folder)
        self.manifest = load_manifest(folder)
        if model_config is not None:
            self.manifest.check_model(model_config)
        if not self.manifest.shards:
            raise ValueError(f"shard set {self.folder} has no shards")
        self.urls = [self.manifest.resolve(self.folder, name) for name in self.manifest.shards]
        self.training, self.seed, self.shuffle_buffer = training, seed, shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.errors: list[str] = []

    def _share(self) -> tuple[list[str], int]:
        """This process's shards and a stream id unique per (rank, dataloader worker)."""
        rank, world = _rank_and_world()
        rank = self.rank if self.rank is not None else rank
        world = self.world_size if self.world_size is not None else world
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        stream, streams = rank * workers + worker, world * workers
        share = self.urls[stream::streams]
        if self.training and not share:
            share = self.urls  # fewer shards than streams: every stream resamples all of them
        return share, stream

    def __iter__(self) -> Iterator[dict]:
        urls, stream = self._share()
        rng = random.Random(f"{self.seed}-{stream}")
        if not self.training:
            return (item for url in urls for item in self._read(url) if "bad" not in item)
        return self._shuffled(self._endless(list(urls), rng), rng)

    def _endless(self, urls: list[str], rng: random.Random) -> Iterator[dict]:
        """Shards drawn at random forever; one that fails to read is not drawn again (while any other is left)."""
        while True:
            url = rng.choice(urls)
            for item in self._read(url):
                if "bad" in item and "key" not in item["bad"] and len(urls) > 1:
                    urls.remove(url)
                yield item

    def _read(self, url: str) -> Iterator[dict]:
        """The shard's samples; a record that does not decode, or the shard failing to read, as a {"bad": note}."""
        failures: list[Exception] = []

        def failed(exc: Exception) -> bool:
            failures.append(exc)
            return True

        for sample in wds.tarfile_to_samples(handler=failed)([{"url": url}]):
            try:
                yield decode_sample(sample)
            except (KeyError, ValueError, OSError) as exc:
                yield self._bad(url, exc, key=sample.get("__key__", "?"))
        if not failures and not _ends_whole(url):
            failures.append(EOFError("no end-of-archive marker: the shard is truncated"))
        for exc in failures:
            yield self._bad(url, exc)

    def _bad(self, url: str, exc: Exception, key: str | None = None) -> dict:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        self.errors.append(reason)
        return {"bad": {"shard": url, "reason": reason, **({"key": key} if key is not None else {})}}

    def _shuffled(self, items: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        buffer: list[dict] = []
        for item in items:
            if "bad" in item:  # notes pass the buffer at once
                yield item
                continue
            buffer.append(item)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer


def _ends_whole(path: str) -> bool:
    """A tar ends with two zero blocks: cut at a member's edge it reads as shorter, not as broken."""
    try:
        with open(path, "rb") as tar:
            tar.seek(-1024, os.SEEK_END)
            return tar.read(1024) == bytes(1024)
    except OSError:
        return False


def collate(items: list[dict]) -> dict:
    """A batch of samples, and under "bad" the notes of what was skipped while drawing it (then it is smaller)."""
    samples = [s for s in items if "bad" not in s]
    return {"key": [s["key"] for s in samples], "caption": [s["caption"] for s in samples],
            "latent": torch.stack([s["latent"] for s in samples]) if samples else torch.empty(0),
            "text": torch.stack([s["text"] for s in samples]) if samples else torch.empty(0),
            "bad": [s["bad"] for s in items if "bad" in s]}


class BadDataError(ValueError):
    """More of a shard set is corrupt than the run accepts."""


class BadData:
    """What training skipped as corrupt: the shards (path -> first reason) and the records ("path#key"). Past
    `max_fraction` of the set's `shards` bad, `add` raises BadDataError naming them."""

    def __init__(self, shards: int, max_fraction: float, seen: dict | None = None):
        self.shards_total, self.max_fraction = shards, max_fraction
        self.shards: dict[str, str] = dict((seen or {}).get("shards", {}))
        self.records: set[str] = set((seen or {}).get("records", []))

    def add(self, notes: list[dict]) -> list[dict]:
        """Count the notes; returns those of shards not seen bad before."""
        new = [note for note in notes if note["shard"] not in self.shards]
        for note in notes:
            self.shards.setdefault(note["shard"], note["reason"])
            if "key" in note:
                self.records.add(f"{note['shard']}#{note['key']}")
        if notes and len(self.shards) > self.max_fraction * self.shards_total:
            named = "; ".join(f"{shard}: {reason}" for shard, reason in sorted(self.shards.items()))
            raise BadDataError(f"bad data: {len(self.shards)} of {self.shards_total} shards are unreadable or hold "
                               f"corrupt records, more than data.max_bad_fraction={self.max_fraction:g} allows: "
                               f"{named}. Re-encode or remove them (dataprep), or raise data.max_bad_fraction")
        return list({note["shard"]: note for note in new}.values())

    def merge(self, other: dict) -> None:
        for shard, reason in other.get("shards", {}).items():
            self.shards.setdefault(shard, reason)
        self.records.update(other.get("records", []))

    def metrics(self) -> dict[str, int]:
        """bad_shards and bad_records, once anything was skipped."""
        return {"bad_shards": len(self.shards), "bad_records": len(self.records)} if self.shards else {}

    def state(self) -> dict:
        return {"shards": dict(sorted(self.shards.items())), "records": sorted(self.records)}


def make_loader(folder: str | Path, batch_size: int, model_config: ModelConfig | None = None, training: bool = True,
                seed: int = 0, num_workers: int = 0, shuffle_buffer: int = 1000, rank: int | None = None,
                world_size: int | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader over a shard set; in training mode it never ends (count steps, not epochs)."""
    dataset = ShardStream(folder, model_config, training=training, seed=seed, shuffle_buffer=shuffle_buffer,
                          rank=rank, world_size=world_size)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                       collate_fn=collate, drop_last=training,
                                       persistent_workers=num_workers > 0)
