"""Readers that turn image+caption data sets into one uniform record stream.

Every reader yields, lazily, either a :class:`RawRecord` (an image reference
plus its raw caption) or a :class:`SkippedRecord` (input that cannot be used,
with the reason). A RawRecord's `image_key` names its source image: records
that are captions of one image share it. Per-record problems never raise:
they become skipped records, so the pipeline can count and report them.
Problems with the source as a whole (a missing root, shard or index file, an
unknown source kind) raise ``FileNotFoundError`` / ``ValueError`` as soon as
the reader is called.

Supported sources:

* :func:`read_coco` - the MS-COCO captions layout,
* :func:`read_webdataset` - img2dataset-style WebDataset tars,
* :func:`read_folder` - a folder of images with a CSV or JSONL index,
* :func:`open_source` - dispatch from a spec string or dict.

:func:`load_image` and :func:`clean_caption` turn a record into model input
and raise :class:`Skip` when that is impossible.

Paths may be local paths or any fsspec URL.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import re
import tarfile
import unicodedata
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
from braceexpand import braceexpand
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class RawRecord:
    """One (image, caption) pair; exactly one of image_bytes/image_path is set.

    `image_key` is the identity of the source image, the same for every caption
    of it and stable across runs (the train/val split hashes it).
    """

    key: str
    caption: str
    image_bytes: bytes | None
    image_path: str | None
    meta: dict
    image_key: str


@dataclass(frozen=True)
class SkippedRecord:
    """Input that was read but cannot be used; `reason` says why."""

    key: str
    reason: str
    meta: dict


class Skip(Exception):
    """A record that cannot be used; str(exc) is the reason."""


def _safe_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "_"


def _to_url(fs, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _resolve(root_path: str, path: str) -> str:
    """`path` relative to `root_path` unless it is absolute or a URL."""
    if "://" in path:
        return url_to_fs(path)[1]
    return posixpath.normpath(posixpath.join(root_path, path))


# --------------------------------------------------------------------------- COCO


def read_coco(
    root: str,
    captions_file: str | None = None,
    split: str | None = None,
    image_dir: str | None = None,
) -> Iterator[RawRecord | SkippedRecord]:
    """Read an MS-COCO captions data set: one record per (image, caption).

    The captions json is `captions_file` (relative to `root` unless absolute),
    else ``root/annotations/captions_<split>.json``; without `split` the single
    ``root/annotations/captions_*.json`` is used. `split` defaults to the
    ``<split>`` part of the json's name.

    Images are looked up in `image_dir` (relative to `root` unless absolute)
    or else in the first of ``root/<split>``, ``root/images/<split>``,
    ``root/images`` and the json's own folder that holds any of the images.

    Keys are ``coco-<image id, 12 digits>-<caption number within the image>``;
    the image key is ``coco-<image id, 12 digits>``.
    """
    fs, root_path = url_to_fs(root)
    if not fs.isdir(root_path):
        raise FileNotFoundError(f"COCO root not found: {root}")
    json_path = _coco_captions_path(fs, root_path, captions_file, split)
    if split is None:
        match = re.fullmatch(r"captions_(.+)\.json", posixpath.basename(json_path))
        split = match.group(1) if match else None
    try:
        with fs.open(json_path, "rb") as f:
            data = json.load(f)
        images, annotations = data["images"], data["annotations"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"not a COCO captions file: {_to_url(fs, json_path)}: {e!r}") from e
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise ValueError(f"not a COCO captions file: {_to_url(fs, json_path)}")

    images_by_id = {img["id"]: img for img in images if isinstance(img, dict) and isinstance(img.get("id"), (int, str))}
    wanted = {img.get("file_name") for img in images_by_id.values()}
    img_path, present = _coco_image_dir(fs, root_path, json_path, split, image_dir, wanted)
    return _iter_coco(fs, img_path, split, images_by_id, annotations, present)


def _coco_captions_path(fs, root_path: str, captions_file: str | None, split: str | None) -> str:
    if captions_file is not None:
        path = _resolve(root_path, captions_file)
    elif split is not None:
        path = posixpath.join(root_path, "annotations", f"captions_{split}.json")
    else:
        found = sorted(fs.glob(posixpath.join(root_path, "annotations", "captions_*.json")))
        if len(found) > 1:
            names = ", ".join(posixpath.basename(p) for p in found)
            raise ValueError(f"several COCO caption files in {root_path}/annotations ({names}); pass split=")
        if not found:
            raise FileNotFoundError(f"no annotations/captions_*.json under COCO root {_to_url(fs, root_path)}")
        path = found[0]
    if not fs.isfile(path):
        raise FileNotFoundError(f"COCO captions file not found: {_to_url(fs, path)}")
    return path


def _coco_image_dir(fs, root_path, json_path, split, image_dir, wanted) -> tuple[str, set[str]]:
    """Pick the image folder; return it with the names of the files it holds."""
    if image_dir is not None:
        candidates = [_resolve(root_path, image_dir)]
        if not fs.isdir(candidates[0]):
            raise FileNotFoundError(f"COCO image folder not found: {_to_url(fs, candidates[0])}")
    else:
        candidates = [
            *([posixpath.join(root_path, split), posixpath.join(root_path, "images", split)] if split else []),
            posixpath.join(root_path, "images"),
            posixpath.dirname(json_path),
        ]
    for path in candidates:
        if not fs.isdir(path):
            continue
        present = {posixpath.basename(p) for p in fs.ls(path, detail=False)}
        if image_dir is not None or present & wanted:
            return path, present
    looked = ", ".join(_to_url(fs, p) for p in candidates)
    raise FileNotFoundError(f"no folder holding the COCO images found; looked in: {looked} (pass image_dir=)")


def _iter_coco(fs, img_path, split, images_by_id, annotations, present):
    captions_per_image: dict = {}
    for index, ann in enumerate(annotations):
        meta = {"source": "coco", "split": split, "annotation_index": index}
        if not (
            isinstance(ann, dict) and isinstance(ann.get("caption"), str) and isinstance(ann.get("image_id"), (int, str))
        ):
            yield SkippedRecord(f"coco-ann-{index}", "malformed annotation (needs image_id and caption)", meta)
            continue
        image_id = ann["image_id"]
        meta["image_id"] = image_id
        meta["annotation_id"] = ann.get("id")
        n = captions_per_image.get(image_id, 0)
        captions_per_image[image_id] = n + 1
        id_part = f"{image_id:012d}" if isinstance(image_id, int) else _safe_key(str(image_id))
        image_key = f"coco-{id_part}"
        key = f"{image_key}-{n}"
        image = images_by_id.get(image_id)
        if image is None:
            yield SkippedRecord(key, f"annotation refers to unknown image id {image_id!r}", meta)
            continue
        file_name = image.get("file_name")
        meta.update(file_name=file_name, width=image.get("width"), height=image.get("height"))
        if not isinstance(file_name, str) or not file_name:
            yield SkippedRecord(key, "image entry has no file_name", meta)
            continue
        path = posixpath.join(img_path, file_name)
        if file_name not in present:
            yield SkippedRecord(key, f"image file missing: {_to_url(fs, path)}", meta)
            continue
        yield RawRecord(key, ann["caption"], None, _to_url(fs, path), meta, image_key)


# ------------------------------------------------------------------- WebDataset


def read_webdataset(urls: str | Sequence[str]) -> Iterator[RawRecord | SkippedRecord]:
    """Read img2dataset-style tars: ``<key>.<jpg|jpeg|png|webp>`` + ``<key>.txt``
    [+ ``<key>.json``, parsed into ``meta["json"]``].

    `urls` is one URL or a list; each may be a local path or fsspec URL and
    may hold brace patterns (``shard-{000..009}.tar``). Tars may be gzip/bz2/xz
    compressed. Keys are the sample keys with unsafe characters replaced by
    ``_``; a repeated key is skipped. A sample holds one image, so its key is
    also its image key.

    A truncated or corrupt tar keeps the samples read before the damage,
    yields one SkippedRecord for the rest of it and goes on with the next tar.
    """
    patterns = [urls] if isinstance(urls, str) else list(urls)
    expanded = [u for pattern in patterns for u in braceexpand(pattern)]
    if not expanded:
        raise ValueError("no webdataset URLs given")
    for url in expanded:
        fs, path = url_to_fs(url)
        if not fs.isfile(path):
            raise FileNotFoundError(f"webdataset shard not found: {url}")
    return _iter_webdataset(expanded)


def _iter_webdataset(urls: list[str]) -> Iterator[RawRecord | SkippedRecord]:
    seen: set[str] = set()
    for url in urls:
        for item in _iter_tar(url):
            if isinstance(item, RawRecord):
                if item.key in seen:
                    yield SkippedRecord(item.key, "duplicate key", item.meta)
                    continue
                seen.add(item.key)
            yield item


class _StrictTarInfo(tarfile.TarInfo):
    """TarInfo that reports an archive ending anywhere but at its end-of-archive
    marker as an error; plain tarfile treats an empty, short or garbled header
    after the first member as a normal end and silently drops the rest."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.HeaderError as e:
            raise tarfile.ReadError(f"truncated or corrupt header at byte {tar.offset}: {e}") from None


def _iter_tar(url: str) -> Iterator[RawRecord | SkippedRecord]:
    tar_meta = {"source": "wds", "url": url}
    tar_key = "wds-" + _safe_key(posixpath.basename(url))
    try:
        raw = fsspec.open(url, "rb").open()
    except OSError as e:
        yield SkippedRecord(tar_key, f"cannot open tar: {e!r}", tar_meta)
        return
    samples = 0
    group_key: str | None = None
    group: dict[str, bytes] = {}
    damage = None
    try:
        with raw, tarfile.open(fileobj=raw, mode="r|*", tarinfo=_StrictTarInfo) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, suffix = _split_member_name(member.name)
                if key != group_key:
                    if group_key is not None:
                        yield _wds_sample(url, group_key, group)
                        samples += 1
                    group_key, group = key, {}
                group[suffix] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        damage = e
    if group_key is not None:
        # after damage the last sample may lack members that were cut off;
        # it is kept only if what was fully read makes a usable record
        sample = _wds_sample(url, group_key, group)
        if damage is None or isinstance(sample, RawRecord):
            yield sample
            samples += 1
            group_key = None
    if damage is not None:
        meta = {**tar_meta, "samples_read": samples, "incomplete_sample": group_key}
        reason = f"truncated or corrupt tar after {samples} samples, rest of it skipped: {damage}"
        yield SkippedRecord(tar_key + "-rest", reason, meta)


def _split_member_name(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the file name."""
    folder, base = posixpath.split(name)
    stem, _, suffix = base.partition(".")
    return posixpath.join(folder, stem), suffix.lower()


def _wds_sample(url: str, sample_key: str, group: dict[str, bytes]) -> RawRecord | SkippedRecord:
    key = _safe_key(sample_key)
    meta: dict = {"source": "wds", "url": url, "sample_key": sample_key}
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in group), None)
    if image_ext is None:
        return SkippedRecord(key, f"sample has no image ({'/'.join(IMAGE_EXTENSIONS)}); members: {sorted(group)}", meta)
    if "txt" not in group:
        return SkippedRecord(key, f"sample has no caption (.txt); members: {sorted(group)}", meta)
    meta["image_member"] = f"{sample_key}.{image_ext}"
    if "json" in group:
        try:
            meta["json"] = json.loads(group["json"])
        except ValueError as e:
            meta["json_error"] = f"unparsable .json: {e}"
    try:
        caption = group["txt"].decode("utf-8")
    except UnicodeDecodeError:
        return SkippedRecord(key, "caption is not valid UTF-8", meta)
    return RawRecord(key, caption, group[image_ext], None, meta, key)


# ----------------------------------------------------------------------- folder


def read_folder(root: str, index_file: str) -> Iterator[RawRecord | SkippedRecord]:
    """Read a folder of images indexed by a CSV or JSONL file.

    `index_file` (relative to `root` unless absolute) is chosen by extension:
    ``.csv`` needs a header with ``file`` and ``caption`` columns; ``.jsonl`` /
    ``.ndjson`` holds one ``{"file": ..., "caption": ...}`` object a line.
    ``file`` is relative to `root`; other columns/fields go to
    ``meta["extra"]``. Keys are ``folder-<row number, 9 digits>``; the image
    key is ``file`` normalised (``./a.jpg`` and ``a.jpg`` are one image), so
    rows naming the same file are captions of one image.
    """
    fs, root_path = url_to_fs(root)
    if not fs.isdir(root_path):
        raise FileNotFoundError(f"image folder not found: {root}")
    index_path = _resolve(root_path, index_file)
    if not fs.isfile(index_path):
        raise FileNotFoundError(f"index file not found: {_to_url(fs, index_path)}")
    ext = posixpath.splitext(index_path)[1].lower()
    if ext == ".csv":
        with _open_text(fs, index_path) as f:
            header = next(csv.reader(f), [])
        columns = [c.strip().lower() for c in header]
        if "file" not in columns or "caption" not in columns:
            raise ValueError(f"CSV index needs a header with 'file' and 'caption' columns, got {header}: {index_path}")
        rows = _csv_rows(fs, index_path, columns)
    elif ext in (".jsonl", ".ndjson"):
        rows = _jsonl_rows(fs, index_path)
    else:
        raise ValueError(f"index file must be .csv, .jsonl or .ndjson: {index_path}")
    return _iter_folder(fs, root_path, index_path, rows)


def _open_text(fs, path: str) -> io.TextIOWrapper:
    # surrogateescape defers bad UTF-8 to the row that holds it (see _bad_text)
    return io.TextIOWrapper(fs.open(path, "rb"), encoding="utf-8-sig", errors="surrogateescape", newline="")


def _bad_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _csv_rows(fs, path: str, columns: list[str]):
    """Yield (line number, row dict or None, error) per data row."""
    with _open_text(fs, path) as f:
        reader = csv.reader(f)
        next(reader, None)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield reader.line_num, None, f"bad CSV row: {e}"
                continue
            if not row:
                continue
            if len(row) != len(columns):
                yield reader.line_num, None, f"bad CSV row: expected {len(columns)} fields, got {len(row)}"
                continue
            yield reader.line_num, dict(zip(columns, row)), None


def _jsonl_rows(fs, path: str):
    """Yield (line number, row dict or None, error) per non-blank line."""
    with fs.open(path, "rb") as f:
        for line_num, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                yield line_num, None, f"bad JSONL line: {e}"
                continue
            if not isinstance(row, dict):
                yield line_num, None, f"bad JSONL line: expected an object, got {type(row).__name__}"
                continue
            yield line_num, row, None


def _iter_folder(fs, root_path, index_path, rows) -> Iterator[RawRecord | SkippedRecord]:
    for n, (line_num, row, error) in enumerate(rows):
        key = f"folder-{n:09d}"
        meta: dict = {"source": "folder", "index": _to_url(fs, index_path), "line": line_num}
        if error is None and any(isinstance(v, str) and _bad_text(v) for v in row.values()):
            error = "row is not valid UTF-8"
        if error is not None:
            yield SkippedRecord(key, error, meta)
            continue
        file, caption = row.get("file"), row.get("caption")
        meta["file"] = file
        extra = {k: v for k, v in row.items() if k not in ("file", "caption")}
        if extra:
            meta["extra"] = extra
        if not isinstance(file, str) or not file.strip():
            yield SkippedRecord(key, "row has no 'file'", meta)
            continue
        if not isinstance(caption, str):
            yield SkippedRecord(key, "row has no string 'caption'", meta)
            continue
        path = _resolve(root_path, file.strip())
        if not fs.isfile(path):
            yield SkippedRecord(key, f"image file missing: {_to_url(fs, path)}", meta)
            continue
        yield RawRecord(key, caption, None, _to_url(fs, path), meta, posixpath.normpath(file.strip()))


# ---------------------------------------------------------------------- dispatch

_READERS = {"coco": read_coco, "wds": read_webdataset, "webdataset": read_webdataset, "folder": read_folder}


def open_source(spec: str | Mapping, **kw) -> Iterator[RawRecord | SkippedRecord]:
    """Open a source described by a spec string or dict.

    Strings:

    * ``"coco:<root>"`` - :func:`read_coco`; `captions_file`, `split`,
      `image_dir` may be passed as keywords.
    * ``"wds:<url or brace pattern>"`` (or ``"webdataset:..."``) -
      :func:`read_webdataset`.
    * ``"folder:<root>:<index file>"`` - :func:`read_folder`; the index file is
      the part after the last colon (so `<root>` may be a URL). With an
      `index_file` keyword the spec is just ``"folder:<root>"``.

    Dicts name the kind under ``"kind"`` and the reader's arguments under
    their parameter names, e.g. ``{"kind": "coco", "root": "/data/coco",
    "split": "val2017"}`` or ``{"kind": "wds", "urls": [...]}``; `kw` is merged in.

    An unknown kind or a malformed spec raises ValueError; a missing input
    path raises FileNotFoundError naming it. Both happen at call time.
    """
    if isinstance(spec, Mapping):
        params = {**spec, **kw}
        kind = params.pop("kind", None)
        reader = _READERS.get(kind)
        if reader is None:
            raise ValueError(f"unknown source kind {kind!r} in {dict(spec)}; expected one of {sorted(_READERS)}")
        return reader(**params)
    kind, sep, rest = spec.partition(":")
    if kind not in _READERS or not sep:
        raise ValueError(f"unknown source spec {spec!r}; expected '<kind>:...' with kind one of {sorted(_READERS)}")
    if not rest:
        raise ValueError(f"source spec {spec!r} names no input")
    if kind == "folder" and "index_file" not in kw:
        root, _, index_file = rest.rpartition(":")
        if not root or not index_file:
            raise ValueError(f"folder spec must be 'folder:<root>:<index file>', got {spec!r}")
        return read_folder(root, index_file, **kw)
    return _READERS[kind](rest, **kw)


# ----------------------------------------------------------------- model input


def load_image(record: RawRecord, resolution: int, min_size: int | None = None) -> np.ndarray:
    """Decode the record's image to RGB uint8 of shape (resolution, resolution, 3).

    The short side is resized to `resolution` (bicubic, antialiased) and the
    centre cropped. Raises Skip for unreadable or undecodable images and for
    images whose short side is below `min_size` (default resolution // 2).
    Transparent images are composited onto white.
    """
    if min_size is None:
        min_size = resolution // 2
    if record.image_bytes is not None:
        data = record.image_bytes
    else:
        try:
            with fsspec.open(record.image_path, "rb") as f:
                data = f.read()
        except (OSError, ValueError) as e:
            raise Skip(f"cannot read image: {e}") from e
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if min(width, height) < min_size:
            raise Skip(f"image too small: {width}x{height} < {min_size}")
        # lets JPEG decode at a reduced scale whose short side is still >= resolution
        img.draft(None, (resolution, resolution))
        img.load()
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
    except Image.DecompressionBombError as e:
        raise Skip(f"image too large: {e}") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise Skip(f"corrupt image: {e}") from e
    width, height = img.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    return np.array(img, dtype=np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def clean_caption(text: str) -> str:
    """Lowercase, turn punctuation into spaces (keeping apostrophes inside
    words, as in "don't"), collapse whitespace. Raises Skip("empty caption")
    when nothing is left."""
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    text = re.sub(r"[^\w\s']|_", " ", text)
    text = re.sub(r"(?<!\w)'|'(?!\w)", " ", text)
    text = " ".join(text.split())
    if not text:
        raise Skip("empty caption")
    return text
