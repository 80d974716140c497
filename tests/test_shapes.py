"""Tests for the demo shapes data set (both scenes), its attribute reader, caption parser and scorer."""

import hashlib
import json
import re
from dataclasses import replace

import numpy as np
import pytest

from dataprep import shapes
from dataprep.shapes import (
    ATTRIBUTES,
    CHANCE,
    COLOURS,
    MAX_CAPTION_WORDS,
    OPPOSITE,
    POSITIONS,
    RELATION_PHRASES,
    RELATIONS,
    SHAPES,
    SIZES,
    ObjectSpec,
    generate,
    iter_samples,
    make_caption,
    make_relation_caption,
    parse_caption,
    read_attributes,
    render,
    sample_at,
    scene_of,
    score,
    score_caption,
    score_image,
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
    from dataprep.encode import unit_records, demo_units

    units = demo_units(300, seed=4, resolution=32, max_objects=max_objects, per_unit=128)
    assert [(u["start"], u["stop"]) for u in units] == [(0, 128), (128, 256), (256, 300)]
    samples = [s for unit in units for s in unit_records(unit)]
    assert [s.key for s in samples] == [sample_at(i, seed=4).key for i in range(300)]
    counts = {len(s.objects) for s in samples}
    assert counts == ({1} if max_objects == 1 else {1, 2})


def digest(samples):
    h = hashlib.sha256()
    for s in samples:
        h.update(s.key.encode() + s.caption.encode() + s.image.tobytes() + repr(s.objects).encode())
    return h.hexdigest()


def test_objects_scene_is_unchanged_by_the_relations_scene():
    # digests of the set as generated before the relations scene existed
    assert digest(generate(200, seed=3)) == "314307610e4744d3f74c7c93894c6cbf15a4721bb8e73b0b2418bbb402cf048e"
    assert digest(generate(200, seed=3, size=64)) == "0b75b699368928b35ac4f80569b47fb0eecdfddf0a7188b69967e1b02d9e4b0f"
    assert digest(generate(200, seed=3, max_objects=1, scene="objects")) == \
        "3df37324b4abd1c597485f372f2546fc42eb7a26eec03b6e57a2bd5945950e52"


def test_relation_samples_are_deterministic_and_well_formed():
    samples = generate(400, seed=2, size=64, scene="relations")
    assert digest(samples) == digest(iter_samples(400, 2, 64, 2, "relations"))
    assert digest(samples) != digest(generate(400, seed=3, size=64, scene="relations"))
    again = sample_at(17, seed=2, size=64, scene="relations")
    assert again.key == samples[17].key == "relations-2-000017" and again.caption == samples[17].caption
    np.testing.assert_array_equal(again.image, samples[17].image)
    for s in samples:
        subject, other = s.objects
        assert subject.position in RELATIONS and other.position == OPPOSITE[subject.position]
        assert subject.colour != other.colour
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert not s.image[0].any() and not s.image[-1].any() and not s.image[:, 0].any()  # a black margin
        assert re.fullmatch(r"[a-z]+( [a-z]+)*", s.caption) and len(s.caption.split()) <= MAX_CAPTION_WORDS
        assert scene_of(s.caption) == "relations"
    relations = [s.objects[0].position for s in samples]
    assert all(0.15 < relations.count(r) / len(samples) < 0.35 for r in RELATIONS)


def test_scene_arguments_are_checked():
    with pytest.raises(ValueError, match="max_objects must be 2"):
        sample_at(0, max_objects=1, scene="relations")
    with pytest.raises(ValueError, match="unknown scene"):
        sample_at(0, scene="grid")
    with pytest.raises(ValueError, match="unknown scene"):
        read_attributes(np.zeros((32, 32, 3), np.uint8), scene="grid")


def test_reader_recovers_clean_relation_images():
    """Every attribute, the relation included, on 500 clean 64 px images (positions read relative)."""
    samples = generate(500, seed=11, size=64, scene="relations")
    result = mean_scores((read_attributes(s.image, "relations"), s.objects) for s in samples)
    assert all(result[name] >= 0.99 for name in (*ATTRIBUTES, "all")), result


def test_relative_positions_need_exactly_two_objects():
    alone = ObjectSpec("circle", "red", "small", "left")
    assert read_attributes(render([alone], 64), "relations") == (replace(alone, position=None),)
    above = [ObjectSpec("square", "green", "large", "top"), ObjectSpec("triangle", "blue", "small", "bottom")]
    image = render(above, 64, centres=[(20, 8), (14, 24)])
    assert set(read_attributes(image, "relations")) == set(above)
    assert {o.position for o in read_attributes(image)} == {"top", "bottom"}  # absolute, by default


def caption_template(caption, phrase):
    if caption.startswith("there is a "):
        return "there is"
    if caption.startswith(phrase):
        return "relation first"
    return "article" if caption.startswith("a ") else "no article"


def test_relation_captions_round_trip_for_every_template_and_phrase():
    seen = set()
    for seed in range(400):
        rng = np.random.default_rng(seed)
        relation = RELATIONS[seed % len(RELATIONS)]
        subject = ObjectSpec(SHAPES[seed % 3], COLOURS[seed % 6], SIZES[seed % 2], relation)
        other = ObjectSpec(SHAPES[seed // 3 % 3], COLOURS[(seed + 1) % 6], SIZES[seed // 2 % 2], OPPOSITE[relation])
        caption = make_relation_caption(subject, other, rng)
        assert len(caption.split()) <= MAX_CAPTION_WORDS
        assert set(parse_caption(caption)) == {subject, other}, caption
        phrase = next(p for p in sorted(RELATION_PHRASES[relation], key=len, reverse=True) if p in caption)
        seen.add((phrase, caption_template(caption, phrase)))
    phrases = {p for options in RELATION_PHRASES.values() for p in options}
    templates = {"there is", "relation first", "article", "no article"}
    assert seen == {(p, t) for p in phrases for t in templates}


def test_parse_relation_captions_by_hand():
    red, blue = ObjectSpec("circle", "red", None, "left"), ObjectSpec("square", "blue", None, "right")
    assert parse_caption("a red circle left of a blue square") == (red, blue)
    assert parse_caption("A red circle, to the RIGHT of a blue square.") == (
        replace(red, position="right"), replace(blue, position="left"))
    big_blue = ObjectSpec("square", "blue", "large", "bottom")
    assert parse_caption("above a big blue box is a tiny red disc") == (
        big_blue, ObjectSpec("circle", "red", "small", "top"))
    assert parse_caption("a red circle under") == (replace(red, position="bottom"),)
    assert scene_of("a big blue box on the left") == "objects"
    assert scene_of("a big blue box below a red disc") == "relations"
    # absolute captions parse as before
    assert parse_caption("a small red circle on the left and a big blue box on the right") == (
        ObjectSpec("circle", "red", "small", "left"), ObjectSpec("square", "blue", "large", "right"))


def test_score_image_and_score_caption_read_positions_as_the_caption_states_them():
    for s in generate(20, seed=6, size=64, scene="relations"):
        assert score_image(s.image, s.caption)["all"] == 1.0
        assert score_caption(s.caption, s.caption)["all"] == 1.0
        subject, other = s.objects
        swapped = make_relation_caption(replace(subject, position=other.position),
                                        replace(other, position=subject.position), np.random.default_rng(0))
        assert score_image(s.image, swapped)["all"] == 0.0 and score_image(s.image, swapped)["colour"] == 0.0
        assert score_caption(swapped, s.caption)["all"] == 0.0
    for s in generate(20, seed=6):
        assert score_image(s.image, s.caption) == score(read_attributes(s.image), parse_caption(s.caption))
        assert score_image(s.image, s.caption)["all"] == 1.0


def test_chance_levels_per_scene():
    assert CHANCE["objects"] == {"shape": 1 / 3, "colour": 1 / 6, "size": 1 / 2, "position": 1 / 5}
    assert CHANCE["relations"] == {"shape": 1 / 3, "colour": 1 / 6, "size": 1 / 2, "position": 1 / 4}


def test_demo_encoding_units_carry_the_scene():
    from dataprep.encode import demo_units, load_rows

    units = demo_units(40, seed=4, resolution=64, scene="relations", per_unit=16)
    rows = [row for unit in units for row in load_rows(unit, 64)]
    samples = generate(40, seed=4, size=64, scene="relations")
    assert [(row["key"], row["caption"]) for row in rows] == [(s.key, s.caption) for s in samples]
    np.testing.assert_array_equal(np.stack([row["image"] for row in rows]), np.stack([s.image for s in samples]))


@pytest.mark.ray
def test_dataprep_builds_relation_shards_with_16x16_latents(ray_local, tmp_path):
    from dataprep.__main__ import main as dataprep_main

    code = dataprep_main(["demo", "--scene", "relations", "--resolution", "64", "--samples", "60",
                          "--samples-per-shard", "30", "--vae-steps", "20", "--val-fraction", "0.2",
                          "--word-dim", "16", "--out", str(tmp_path)])
    assert code == 0
    train = json.loads((tmp_path / "train" / "manifest.json").read_text())
    val = json.loads((tmp_path / "val" / "manifest.json").read_text())
    assert train["latent_shape"] == val["latent_shape"] == [4, 16, 16] and train["resolution"] == 64
    assert train["samples"] + val["samples"] == 60 and train["skipped"] == []
    from psunet.data import ShardStream

    item = next(iter(ShardStream(tmp_path / "train", training=False)))
    assert tuple(item["latent"].shape) == (4, 16, 16)
    index = int(item["key"].rsplit("-", 1)[1])
    assert item["caption"] == sample_at(index, seed=0, size=64, scene="relations").caption


@pytest.mark.parametrize("scene", shapes.SCENES)
def test_every_generated_caption_is_well_formed_and_scrambled_ones_are_not(scene):
    captions = [sample.caption for sample in shapes.generate(400, seed=5, scene=scene)]
    assert all(shapes.is_well_formed(caption) for caption in captions)
    rng = np.random.default_rng(0)
    scrambled = [" ".join(rng.permutation(caption.split())) for caption in captions]
    assert sum(map(shapes.is_well_formed, [s for c, s in zip(captions, scrambled) if c != s])) <= 0.05 * len(captions)


@pytest.mark.parametrize("caption", ["little the green a at green triangle", "a small red circle on the top",
                                     "a small red on the left", "above a blue box is a red disc",
                                     "a small red circle on the left and", "there is a small red circle left of"])
def test_captions_outside_the_grammar_are_not_well_formed(caption):
    assert not shapes.is_well_formed(caption)
