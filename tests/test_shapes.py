"""Tests for the demo shapes data set, its attribute reader, caption parser and scorer."""

import re

import numpy as np
import pytest

from dataprep.shapes import (
    ATTRIBUTES,
    COLOURS,
    MAX_CAPTION_WORDS,
    POSITIONS,
    SHAPES,
    SIZES,
    ObjectSpec,
    generate,
    iter_samples,
    make_caption,
    parse_caption,
    read_attributes,
    render,
    sample_at,
    score,
)


def mean_scores(pairs):
    scores = [score(predicted, truth) for predicted, truth in pairs]
    return {name: float(np.mean([s[name] for s in scores])) for name in (*ATTRIBUTES, "all")}


def test_same_seed_same_samples_other_seed_different():
    a, b, c = generate(20, seed=3), generate(20, seed=3), generate(20, seed=4)
    for x, y in zip(a, b):
        assert x.key == y.key and x.caption == y.caption and x.objects == y.objects
        np.testing.assert_array_equal(x.image, y.image)
    assert [x.caption for x in a] != [z.caption for z in c]
    assert any(not np.array_equal(x.image, z.image) for x, z in zip(a, c))


def test_sample_at_and_iter_samples_match_generate():
    samples = generate(30, seed=7, size=64)
    assert [s.key for s in samples] == [f"demo-7-{i:06d}" for i in range(30)]
    for i in (0, 13, 29):
        s = sample_at(i, seed=7, size=64)
        assert s.key == samples[i].key and s.caption == samples[i].caption
        np.testing.assert_array_equal(s.image, samples[i].image)
    assert [s.caption for s in iter_samples(30, 7, 64, 2)] == [s.caption for s in samples]


@pytest.mark.parametrize("size", [32, 64])
def test_image_format(size):
    for s in generate(20, size=size):
        assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
        assert not s.image[0, 0].any() and not s.image[-1, -1].any()  # black background
        assert 1 <= len(s.objects) <= 2


def test_object_counts_and_two_object_layout():
    samples = generate(500, seed=1)
    doubles = [s.objects for s in samples if len(s.objects) == 2]
    assert 0.2 < len(doubles) / len(samples) < 0.4
    for first, second in doubles:
        assert first.position != second.position and first.colour != second.colour
        assert "center" not in (first.position, second.position)
    assert all(len(s.objects) == 1 for s in generate(100, max_objects=1))
    assert {o.position for s in samples for o in s.objects} == set(POSITIONS)


def test_captions_are_plain_lowercase_words():
    for s in generate(300, seed=2):
        assert re.fullmatch(r"[a-z]+( [a-z]+)*", s.caption)
        assert len(s.caption.split()) <= MAX_CAPTION_WORDS
        assert (" and " in s.caption) == (len(s.objects) == 2)


def test_synonyms_and_templates_all_occur():
    words = {w for s in generate(400, seed=5) for w in s.caption.split()}
    assert {"small", "tiny", "little", "large", "big", "square", "box", "circle", "disc"} <= words
    assert {"center", "middle", "there"} <= words
    captions = [s.caption for s in generate(400, seed=5)]
    assert any(c.startswith("a ") for c in captions)
    assert any(c.startswith(("on ", "at ", "in ")) for c in captions)
    assert any(c.startswith("there is a ") for c in captions)


@pytest.mark.parametrize("size, n", [(32, 1000), (64, 200)])
def test_reader_recovers_clean_images(size, n):
    samples = generate(n, seed=11, size=size)
    result = mean_scores((read_attributes(s.image), s.objects) for s in samples)
    assert result["all"] >= 0.99, result


def test_reader_accepts_float_and_finds_nothing_on_black():
    s = sample_at(0)
    assert read_attributes(s.image.astype(np.float32) / 255) == s.objects
    assert read_attributes(np.zeros((32, 32, 3), np.uint8)) == ()


def test_render_without_rng_is_exact():
    obj = ObjectSpec("square", "red", "large", "center")
    image = render([obj])
    assert tuple(image[16, 16]) == (230, 30, 30)
    assert read_attributes(image) == (obj,)


def test_reader_on_noise_is_near_chance():
    rng = np.random.default_rng(0)
    truth = [s.objects for s in generate(200, seed=9)]
    noise = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in truth]
    assert mean_scores((read_attributes(x), t) for x, t in zip(noise, truth))["all"] < 0.2


def test_parse_caption_recovers_objects():
    for s in generate(500, seed=4):
        assert parse_caption(s.caption) == s.objects
    rng = np.random.default_rng(0)
    obj = (ObjectSpec("triangle", "cyan", "small", "bottom"),)
    assert parse_caption(make_caption(obj, rng).split()) == obj


def test_parse_caption_partial_and_unknown_words():
    parsed = parse_caption("a big shiny Box, and the purple thing")
    assert parsed == (ObjectSpec("square", None, "large", None),)
    assert parse_caption("") == ()


def test_score_hand_made_cases():
    red = ObjectSpec("circle", "red", "small", "left")
    blue = ObjectSpec("square", "blue", "large", "right")
    green = ObjectSpec("circle", "green", "small", "left")
    perfect = score([red], [red])
    assert perfect == {name: 1.0 for name in (*ATTRIBUTES, "all")}
    wrong_colour = score([green], [red])
    assert wrong_colour["colour"] == 0.0 and wrong_colour["all"] == 0.0
    assert wrong_colour["shape"] == wrong_colour["size"] == wrong_colour["position"] == 1.0
    # matched by position, not order
    assert score([blue, red], [red, blue])["all"] == 1.0
    # a missing object halves each attribute
    missing = score([red], [red, blue])
    assert missing["shape"] == 0.5 and missing["all"] == 0.0
    assert score([], [red])["shape"] == 0.0
    # parsed caption without positions: matched in order, unknown attributes are wrong
    partial = ObjectSpec("circle", "red", None, None)
    expected = {"shape": 1.0, "colour": 1.0, "size": 0.0, "position": 0.0, "all": 0.0}
    assert score([partial], [red]) == expected


def test_vocabularies():
    assert SHAPES == ("circle", "square", "triangle")
    assert COLOURS == ("red", "green", "blue", "yellow", "magenta", "cyan")
    assert SIZES == ("small", "large")
    assert POSITIONS == ("left", "right", "top", "bottom", "center")


@pytest.mark.parametrize("max_objects", [1, 2])
def test_demo_encoding_units_carry_the_object_limit(max_objects):
    from dataprep.encode import _unit_records, demo_units

    units = demo_units(300, seed=4, resolution=32, max_objects=max_objects, per_unit=128)
    assert [(u["start"], u["stop"]) for u in units] == [(0, 128), (128, 256), (256, 300)]
    samples = [s for unit in units for s in _unit_records(unit)]
    assert [s.key for s in samples] == [sample_at(i, seed=4).key for i in range(300)]
    counts = {len(s.objects) for s in samples}
    assert counts == ({1} if max_objects == 1 else {1, 2})
