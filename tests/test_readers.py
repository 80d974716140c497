import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from dataprep.readers import (
    RawRecord,
    Skip,
    SkippedRecord,
    clean_caption,
    load_image,
    open_source,
    read_coco,
    read_folder,
    read_webdataset,
)

RES = 32


def image_bytes(size=(48, 40), mode="RGB", fmt="JPEG", color=(200, 30, 30), noise=False):
    if noise:
        rng = np.random.default_rng(sum(size))
        img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    else:
        img = Image.new(mode, size, color)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def split(items):
    good = [r for r in items if isinstance(r, RawRecord)]
    skipped = [r for r in items if isinstance(r, SkippedRecord)]
    assert len(good) + len(skipped) == len(items)
    return good, skipped


def noise_shard(path, prefix, n):
    members = []
    for i in range(n):
        members += [
            (f"{prefix}{i:03d}.jpg", image_bytes((64, 64), noise=True)),
            (f"{prefix}{i:03d}.txt", f"caption {prefix} {i}".encode()),
        ]
    write_tar(path, members)
    return [f"{prefix}{i:03d}" for i in range(n)]


# ------------------------------------------------------------------ webdataset


@pytest.fixture
def mixed_shard(tmp_path):
    path = tmp_path / "mixed.tar"
    write_tar(
        path,
        [
            ("000000.jpg", image_bytes()),
            ("000000.txt", b"A red Square."),
            ("000001.png", image_bytes(fmt="PNG", color=(0, 0, 255))),
            ("000001.txt", b"blue"),
            ("000001.json", json.dumps({"url": "http://x/1.png"}).encode()),
            ("000002.jpg", os.urandom(500)),
            ("000002.txt", b"corrupt image"),
            ("000003.jpg", image_bytes()),
            ("000003.txt", b"  ... "),
            ("000004.jpg", image_bytes()),
            ("000005.jpg", image_bytes()),
            ("000005.txt", "caf\u00e9 au lait".encode()),
        ],
    )
    return path


def test_webdataset_mixed_shard(mixed_shard):
    good, skipped = split(list(read_webdataset(str(mixed_shard))))
    assert [r.key for r in good] == ["000000", "000001", "000002", "000003", "000005"]
    assert [r.caption for r in good][:2] == ["A red Square.", "blue"]
    assert all(r.image_bytes and r.image_path is None for r in good)
    assert all(r.image_key == r.key for r in good)  # one image per sample
    assert good[1].meta["json"] == {"url": "http://x/1.png"}

    assert [s.key for s in skipped] == ["000004"]
    assert "caption" in skipped[0].reason and ".txt" in skipped[0].reason

    by_key = {r.key: r for r in good}
    for key in ("000000", "000001", "000005"):
        arr = load_image(by_key[key], RES)
        assert arr.shape == (RES, RES, 3) and arr.dtype == np.uint8
    assert tuple(load_image(by_key["000001"], RES)[16, 16]) == (0, 0, 255)
    with pytest.raises(Skip, match="corrupt"):
        load_image(by_key["000002"], RES)
    with pytest.raises(Skip, match="empty caption"):
        clean_caption(by_key["000003"].caption)
    assert clean_caption(by_key["000005"].caption) == "caf\u00e9 au lait"


def test_webdataset_sample_without_image(tmp_path):
    path = tmp_path / "s.tar"
    write_tar(path, [("a.txt", b"no image"), ("b.jpg", image_bytes()), ("b.txt", b"ok")])
    good, skipped = split(list(read_webdataset(str(path))))
    assert [r.key for r in good] == ["b"]
    assert skipped[0].key == "a" and "no image" in skipped[0].reason


def test_webdataset_truncated_tar_then_next_tar(tmp_path):
    first = noise_shard(tmp_path / "a.tar", "a", 4)
    noise_shard(tmp_path / "b.tar", "b", 4)
    last = noise_shard(tmp_path / "c.tar", "c", 2)
    data = (tmp_path / "b.tar").read_bytes()
    (tmp_path / "b.tar").write_bytes(data[: int(len(data) * 0.6)])

    items = list(read_webdataset([str(tmp_path / "a.tar"), str(tmp_path / "b.tar"), str(tmp_path / "c.tar")]))
    good, skipped = split(items)
    b_keys = [r.key for r in good if r.key.startswith("b")]
    assert 1 <= len(b_keys) < 4
    assert b_keys == [f"b{i:03d}" for i in range(len(b_keys))]
    assert len(skipped) == 1
    assert "truncated" in skipped[0].reason and skipped[0].meta["url"].endswith("b.tar")
    assert [r.key for r in good] == first + b_keys + last
    # the skip is reported in stream order, right after the last good b record
    assert items.index(skipped[0]) == len(first) + len(b_keys)
    for r in good:
        assert load_image(r, RES).shape == (RES, RES, 3)


def member_offsets(path):
    with tarfile.open(path) as tar:
        return {m.name: m.offset for m in tar.getmembers()}


@pytest.mark.parametrize("damage", ["cut_at_header", "cut_inside_header", "garbage_header"])
def test_webdataset_damage_that_plain_tarfile_reads_as_a_clean_end(tmp_path, damage):
    path = tmp_path / "s.tar"
    noise_shard(path, "s", 4)
    data = bytearray(path.read_bytes())
    at = member_offsets(path)["s002.jpg"]
    if damage == "cut_at_header":
        data = data[:at]
    elif damage == "cut_inside_header":
        data = data[: at + 100]
    else:
        data[at : at + 512] = b"\x07" * 512
    path.write_bytes(bytes(data))

    good, skipped = split(list(read_webdataset(str(path))))
    assert [r.key for r in good] == ["s000", "s001"]
    assert len(skipped) == 1 and "truncated or corrupt" in skipped[0].reason


def test_webdataset_incomplete_last_sample_is_part_of_the_skip(tmp_path):
    path = tmp_path / "s.tar"
    noise_shard(path, "s", 3)
    data = path.read_bytes()
    path.write_bytes(data[: member_offsets(path)["s001.txt"] + 100])

    good, skipped = split(list(read_webdataset(str(path))))
    assert [r.key for r in good] == ["s000"]
    assert skipped[0].meta["incomplete_sample"] == "s001"


def test_webdataset_brace_pattern_through_fsspec(tmp_path):
    noise_shard(tmp_path / "shard-000.tar", "x", 2)
    noise_shard(tmp_path / "shard-001.tar", "y", 3)
    for pattern in (f"file://{tmp_path}/shard-{{000..001}}.tar", f"{tmp_path}/shard-{{000..001}}.tar"):
        good, skipped = split(list(read_webdataset(pattern)))
        assert [r.key for r in good] == ["x000", "x001", "y000", "y001", "y002"]
        assert not skipped


def test_webdataset_duplicate_keys_across_shards_are_skipped(tmp_path):
    noise_shard(tmp_path / "a.tar", "k", 2)
    noise_shard(tmp_path / "b.tar", "k", 1)
    good, skipped = split(list(read_webdataset([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")])))
    assert [r.key for r in good] == ["k000", "k001"]
    assert [(s.key, s.reason) for s in skipped] == [("k000", "duplicate key")]


def test_webdataset_is_lazy(tmp_path):
    noise_shard(tmp_path / "a.tar", "a", 3)
    stream = read_webdataset(str(tmp_path / "a.tar"))
    assert next(stream).key == "a000"
    stream.close()


# ------------------------------------------------------------------------ COCO


def make_coco(root, split_name="val2017", image_folder=None):
    images = [
        {"id": 139, "file_name": "000000000139.jpg", "width": 48, "height": 40},
        {"id": 285, "file_name": "000000000285.jpg", "width": 48, "height": 40},
        {"id": 632, "file_name": "000000000632.jpg", "width": 48, "height": 40},
    ]
    annotations = [
        {"id": 10 + i * 2 + j, "image_id": img["id"], "caption": f"Image {img['id']}, caption {j}."}
        for i, img in enumerate(images)
        for j in range(2)
    ]
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / f"captions_{split_name}.json").write_text(
        json.dumps({"images": images, "annotations": annotations})
    )
    folder = root / (image_folder or split_name)
    folder.mkdir(parents=True)
    (folder / "000000000139.jpg").write_bytes(image_bytes())
    (folder / "000000000632.jpg").write_bytes(b"not a jpeg at all")


def test_coco(tmp_path):
    make_coco(tmp_path)
    good, skipped = split(list(read_coco(str(tmp_path))))
    assert len(good) == 4 and len(skipped) == 2
    assert [r.key for r in good] == [
        "coco-000000000139-0",
        "coco-000000000139-1",
        "coco-000000000632-0",
        "coco-000000000632-1",
    ]
    assert good[0].caption == "Image 139, caption 0."
    assert [r.image_key for r in good] == ["coco-000000000139"] * 2 + ["coco-000000000632"] * 2
    assert good[0].image_path == str(tmp_path / "val2017" / "000000000139.jpg")
    assert good[0].meta["split"] == "val2017" and good[0].meta["annotation_id"] == 10
    json.dumps(good[0].meta)

    assert [s.key for s in skipped] == ["coco-000000000285-0", "coco-000000000285-1"]
    assert all("missing" in s.reason and "000000000285.jpg" in s.reason for s in skipped)

    assert load_image(good[0], RES).shape == (RES, RES, 3)
    for record in good[2:]:
        with pytest.raises(Skip, match="corrupt"):
            load_image(record, RES)


def test_coco_explicit_captions_file_and_images_folder(tmp_path):
    make_coco(tmp_path, image_folder="images")
    good, skipped = split(list(read_coco(str(tmp_path), captions_file="annotations/captions_val2017.json")))
    assert len(good) == 4 and len(skipped) == 2
    assert good[0].image_path == str(tmp_path / "images" / "000000000139.jpg")


def test_coco_image_dir_parameter_and_bad_annotations(tmp_path):
    make_coco(tmp_path, image_folder="pics")
    ann_file = tmp_path / "annotations" / "captions_val2017.json"
    data = json.loads(ann_file.read_text())
    data["annotations"] += [{"id": 99, "image_id": 4242, "caption": "orphan"}, {"id": 100, "image_id": 139}]
    ann_file.write_text(json.dumps(data))
    with pytest.raises(FileNotFoundError, match="pass image_dir"):
        read_coco(str(tmp_path), split="val2017")

    good, skipped = split(list(read_coco(str(tmp_path), split="val2017", image_dir="pics")))
    assert len(good) == 4
    reasons = [s.reason for s in skipped]
    assert sum("missing" in r for r in reasons) == 2
    assert any("unknown image id 4242" in r for r in reasons)
    assert any("malformed annotation" in r for r in reasons)
    assert len({s.key for s in skipped} | {r.key for r in good}) == len(skipped) + len(good)


# ---------------------------------------------------------------------- folder


@pytest.fixture
def image_folder(tmp_path):
    (tmp_path / "img" / "sub").mkdir(parents=True)
    (tmp_path / "img" / "a.jpg").write_bytes(image_bytes())
    (tmp_path / "img" / "sub" / "b.png").write_bytes(image_bytes(fmt="PNG"))
    return tmp_path / "img"


def test_folder_csv(image_folder):
    (image_folder / "index.csv").write_text(
        "file,caption,source\n"
        'a.jpg,"A cat, sitting.",web\n'
        "sub/b.png,a dog,camera\n"
        "gone.jpg,missing,web\n"
        "a.jpg,too,many,fields\n"
        "\n"
        "a.jpg,second caption for a,web\n"
    )
    good, skipped = split(list(read_folder(str(image_folder), "index.csv")))
    assert [(r.key, r.caption) for r in good] == [
        ("folder-000000000", "A cat, sitting."),
        ("folder-000000001", "a dog"),
        ("folder-000000004", "second caption for a"),
    ]
    assert good[1].image_path == str(image_folder / "sub" / "b.png")
    assert [r.image_key for r in good] == ["a.jpg", "sub/b.png", "a.jpg"]
    assert good[0].meta["extra"] == {"source": "web"}
    assert [s.key for s in skipped] == ["folder-000000002", "folder-000000003"]
    assert "missing" in skipped[0].reason and "gone.jpg" in skipped[0].reason
    assert "bad CSV row" in skipped[1].reason and skipped[1].meta["line"] == 5
    for r in good:
        assert load_image(r, RES).shape == (RES, RES, 3)


def test_folder_csv_needs_header(image_folder):
    (image_folder / "index.csv").write_text("a.jpg,a cat\n")
    with pytest.raises(ValueError, match="header"):
        read_folder(str(image_folder), "index.csv")


def test_folder_jsonl(image_folder):
    lines = [
        json.dumps({"file": "a.jpg", "caption": "a cat"}),
        json.dumps({"file": "./sub//b.png", "caption": "a dog", "id": 7}),
        json.dumps({"file": "nope.png", "caption": "missing"}),
        "{not json",
        json.dumps(["a.jpg", "list"]),
        json.dumps({"file": "a.jpg"}),
        "",
    ]
    (image_folder / "index.jsonl").write_text("\n".join(lines) + "\n")
    good, skipped = split(list(read_folder(str(image_folder), str(image_folder / "index.jsonl"))))
    assert [r.caption for r in good] == ["a cat", "a dog"]
    assert [r.image_key for r in good] == ["a.jpg", "sub/b.png"]
    assert good[1].meta["extra"] == {"id": 7}
    reasons = [s.reason for s in skipped]
    assert len(reasons) == 4
    assert "missing" in reasons[0]
    assert reasons[1].startswith("bad JSONL line") and reasons[2].startswith("bad JSONL line")
    assert "caption" in reasons[3]


# ------------------------------------------------------------------ load_image


def record_of(data):
    return RawRecord("k", "c", data, None, {}, "k")


def test_load_image_resizes_short_side_and_center_crops():
    img = Image.new("RGB", (96, 32))
    img.paste((255, 0, 0), (0, 0, 32, 32))
    img.paste((0, 255, 0), (32, 0, 64, 32))
    img.paste((0, 0, 255), (64, 0, 96, 32))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    arr = load_image(record_of(buf.getvalue()), 16)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8
    assert (arr[:, 2:-2] == (0, 255, 0)).all()

    tall = load_image(record_of(image_bytes((40, 100), fmt="PNG", color=(9, 99, 199))), RES)
    assert tall.shape == (RES, RES, 3) and (tall == (9, 99, 199)).all()


def test_load_image_downscales_large_jpeg():
    arr = load_image(record_of(image_bytes((640, 480), noise=True)), RES)
    assert arr.shape == (RES, RES, 3) and arr.dtype == np.uint8


@pytest.mark.parametrize(
    "mode,color,expected",
    [("L", 128, (128, 128, 128)), ("RGBA", (255, 0, 0, 255), (255, 0, 0)), ("RGBA", (255, 0, 0, 0), (255, 255, 255))],
)
def test_load_image_converts_to_rgb(mode, color, expected):
    arr = load_image(record_of(image_bytes((40, 40), mode=mode, fmt="PNG", color=color)), RES)
    assert arr.shape == (RES, RES, 3)
    assert (arr == expected).all()


def test_load_image_palette():
    img = Image.new("RGB", (40, 40), (10, 200, 10)).convert("P", palette=Image.Palette.ADAPTIVE)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    arr = load_image(record_of(buf.getvalue()), RES)
    assert arr.shape == (RES, RES, 3) and abs(int(arr[0, 0, 1]) - 200) <= 2


def test_load_image_too_small():
    with pytest.raises(Skip, match=r"image too small: 10x10 < 16"):
        load_image(record_of(image_bytes((10, 10))), RES)
    with pytest.raises(Skip, match=r"image too small: 20x15 < 64"):
        load_image(record_of(image_bytes((20, 15))), 128)
    assert load_image(record_of(image_bytes((10, 10))), RES, min_size=8).shape == (RES, RES, 3)


def test_load_image_truncated_jpeg_is_corrupt():
    data = image_bytes((64, 64), noise=True)
    with pytest.raises(Skip, match="corrupt image"):
        load_image(record_of(data[: len(data) // 2]), RES)


def test_load_image_from_path(tmp_path):
    (tmp_path / "x.png").write_bytes(image_bytes(fmt="PNG"))
    assert load_image(RawRecord("k", "c", None, str(tmp_path / "x.png"), {}, "k"), RES).shape == (RES, RES, 3)
    with pytest.raises(Skip, match="cannot read image"):
        load_image(RawRecord("k", "c", None, str(tmp_path / "gone.png"), {}, "k"), RES)


# --------------------------------------------------------------- clean_caption


@pytest.mark.parametrize(
    "text,expected",
    [
        ("  A Dog's ball -- on the GRASS!!\n", "a dog's ball on the grass"),
        ("'Quoted' words, and dogs' toys.", "quoted words and dogs toys"),
        ("It\u2019s a well-known_place", "it's a well known place"),
        ("Two  \t cats", "two cats"),
    ],
)
def test_clean_caption(text, expected):
    assert clean_caption(text) == expected


@pytest.mark.parametrize("text", ["", "   ", "?!...", "' '"])
def test_clean_caption_empty(text):
    with pytest.raises(Skip, match="empty caption"):
        clean_caption(text)


# ----------------------------------------------------------------- open_source


def test_open_source_dispatch(tmp_path, image_folder):
    coco = tmp_path / "coco"
    make_coco(coco)
    assert len(list(open_source(f"coco:{coco}"))) == 6
    assert len(list(open_source({"kind": "coco", "root": str(coco), "split": "val2017"}))) == 6

    noise_shard(tmp_path / "shard-000.tar", "x", 2)
    noise_shard(tmp_path / "shard-001.tar", "y", 1)
    assert len(list(open_source(f"wds:{tmp_path}/shard-{{000..001}}.tar"))) == 3
    assert len(list(open_source({"kind": "wds", "urls": [str(tmp_path / "shard-000.tar")]}))) == 2

    (image_folder / "index.csv").write_text("file,caption\na.jpg,a cat\n")
    assert [r.caption for r in open_source(f"folder:{image_folder}:index.csv")] == ["a cat"]
    assert len(list(open_source(f"folder:{image_folder}", index_file="index.csv"))) == 1
    assert len(list(open_source({"kind": "folder", "root": str(image_folder), "index_file": "index.csv"}))) == 1


def test_open_source_fatal_errors_raise_at_once(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_source(f"coco:{missing}")
    with pytest.raises(FileNotFoundError, match="shard-001"):
        noise_shard(tmp_path / "shard-000.tar", "x", 1)
        open_source(f"wds:{tmp_path}/shard-{{000..001}}.tar")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        open_source(f"folder:{missing}:index.csv")
    (tmp_path / "img").mkdir()
    with pytest.raises(FileNotFoundError, match="index.csv"):
        open_source(f"folder:{tmp_path / 'img'}:index.csv")
    (tmp_path / "img" / "index.txt").write_text("x")
    with pytest.raises(ValueError, match="csv"):
        open_source(f"folder:{tmp_path / 'img'}:index.txt")
    with pytest.raises(FileNotFoundError, match="captions"):
        open_source(f"coco:{tmp_path / 'img'}")
    with pytest.raises(ValueError, match="unknown source"):
        open_source(f"laion:{tmp_path}")
    with pytest.raises(ValueError, match="unknown source"):
        open_source(str(tmp_path))
    with pytest.raises(ValueError, match="unknown source kind"):
        open_source({"kind": "laion", "root": str(tmp_path)})
    with pytest.raises(ValueError, match="folder:<root>:<index file>"):
        open_source("folder:index.csv")
