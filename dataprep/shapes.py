"""The built-in demo data set: captioned synthetic shape images, plus readers to score models with.

Each image is a black square with coloured shapes. Two scenes:

* ``objects`` (the default): one or two objects at absolute positions; the caption names each
  object's size, colour, shape and position ("a small red circle on the left and a big blue box
  on the right");
* ``relations``: two objects of different colours anywhere on the canvas, one clearly left of,
  right of, above or below the other; the caption names both and the relation ("a small red circle
  left of a big blue square", "above a tiny green box is a big cyan disc"). Here an object's
  ``position`` is relative to the other object: in "a red circle left of a blue square" the circle
  is "left" and the square "right"; "above" / "below" give "top" / "bottom" and the opposite.

Every sample is a pure function of (seed, index, size, max_objects, scene), so a set can be built
in parallel chunks.

Two deterministic readers turn model outputs back into attributes for scoring:

* ``read_attributes`` recovers the objects from pixels (text -> image: compare with the prompt);
* ``parse_caption`` recovers them from caption words (image -> text: compare with the image).

``score`` compares a prediction with the truth, attribute by attribute; ``score_image`` and
``score_caption`` apply it to a generated image or caption and the caption it should match, reading
positions as absolute or relative as that caption states them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np

SCENES = ("objects", "relations")
SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
ATTRIBUTES = ("shape", "colour", "size", "position")
# A relation caption's phrases, by the position of the object it describes relative to the other
# object (first is canonical); the other object gets the opposite position.
RELATION_PHRASES = {
    "left": ("left of", "to the left of"),
    "right": ("right of", "to the right of"),
    "top": ("above", "over"),
    "bottom": ("below", "under"),
}
RELATIONS = tuple(RELATION_PHRASES)
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
# Accuracy of a uniform random guess of one object's attribute, per scene: the bar a trained model must clear.
CHANCE = {
    scene: {name: 1 / len(values) for name, values in zip(ATTRIBUTES, (SHAPES, COLOURS, SIZES, positions))}
    for scene, positions in zip(SCENES, (POSITIONS, RELATIONS))
}

PALETTE = {
    "red": (230, 30, 30),
    "green": (30, 200, 30),
    "blue": (40, 40, 230),
    "yellow": (230, 230, 30),
    "magenta": (230, 30, 230),
    "cyan": (30, 220, 220),
}
COLOUR_JITTER = 15

# Geometry in units of size / 32: object centres (x, y) and half-extents.
CENTRES = {
    "left": (8, 16),
    "right": (24, 16),
    "top": (16, 8),
    "bottom": (16, 24),
    "center": (16, 16),
}
HALF_EXTENT = {"small": 4.0, "large": 6.5}
MAX_OFFSET = 1
# Only these pairs are far enough apart never to overlap; "center" is single-object only.
POSITION_PAIRS = (("left", "right"), ("top", "bottom"))
TWO_OBJECT_PROBABILITY = 0.3
# Relations scenes: each object at least EDGE_MARGIN inside the canvas; along the relation's axis the
# two bounding boxes at least GAP apart, across it the centres' offset at most MAX_CROSS_RATIO of
# their offset along it, so the relation is unambiguous.
EDGE_MARGIN = 1.0
GAP = 1.0
MAX_CROSS_RATIO = 0.5

# Caption words: each canonical value and the words that may stand for it (first is canonical).
SYNONYMS = {
    "small": ("small", "tiny", "little"),
    "large": ("large", "big"),
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "center": ("center", "middle"),
}
POSITION_PHRASES = {
    "left": ("on the", "at the"),
    "right": ("on the", "at the"),
    "top": ("at the",),
    "bottom": ("at the",),
    "center": ("in the",),
}
MAX_CAPTION_WORDS = 15
# How a caption says it: an object alone or one of two joined with "and" (OBJECT_TEMPLATES), an object alone
# also with ALONE_TEMPLATES; a relation between two objects (RELATION_TEMPLATES: `relation` is a's position).
OBJECT_TEMPLATES = ("a {what} {where}", "{what} {where}", "{where} a {what}")
ALONE_TEMPLATES = ("there is a {what} {where}",)
RELATION_TEMPLATES = ("a {a} {relation} a {b}", "{a} {relation} {b}", "there is a {a} {relation} a {b}",
                      "{relation} a {b} is a {a}")

# Reader settings. Fill = object area / bounding-box area.
SHAPE_FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
MIN_BRIGHTNESS = 80  # max channel, 0..255
MIN_SATURATION = 0.5  # (max - min) / max
MAX_CHROMA_DISTANCE = 0.35  # to the nearest palette colour, after scaling by the max channel
MIN_AREA = 8  # pixels at 32 px, scales with area


@dataclass(frozen=True)
class ObjectSpec:
    """One object. Fields are canonical names; parsed captions use None for unknown ones."""

    shape: str | None
    colour: str | None
    size: str | None
    position: str | None


@dataclass(frozen=True)
class DemoSample:
    key: str
    image: np.ndarray  # HxWx3 uint8
    caption: str
    objects: tuple[ObjectSpec, ...]  # in a relations scene: the object the relation describes first


def _check_scene(scene: str) -> None:
    if scene not in SCENES:
        raise ValueError(f"unknown scene {scene!r}; choose one of {', '.join(SCENES)}")


def _canonical(objects: Sequence[ObjectSpec]) -> tuple[ObjectSpec, ...]:
    """Objects sorted by position (POSITIONS order; unknown positions last)."""
    return tuple(sorted(objects, key=lambda o: POSITIONS.index(o.position) if o.position else len(POSITIONS)))


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean HxW mask of a shape with bounding box centred at (cx, cy), half-extent r."""
    ys, xs = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx**2 + dy**2 < r**2
    if shape == "square":
        return (np.abs(dx) < r) & (np.abs(dy) < r)
    if shape == "triangle":  # apex up, base down
        return (np.abs(dy) < r) & (np.abs(dx) < (dy + r) / 2)
    raise ValueError(f"unknown shape {shape!r}")


def render(
    objects: Sequence[ObjectSpec],
    size: int = 32,
    rng: np.random.Generator | None = None,
    centres: Sequence[tuple[float, float]] | None = None,
) -> np.ndarray:
    """Draw the objects on black, each with its bounding box centred at its entry of `centres`
    ((x, y) in units of size / 32), by default at its position's CENTRES entry. With an rng, colours
    get a small random jitter, and so do default centres."""
    unit = size / 32
    image = np.zeros((size, size, 3), np.uint8)
    for index, obj in enumerate(objects):
        colour = np.array(PALETTE[obj.colour])
        cx, cy = CENTRES[obj.position] if centres is None else centres[index]
        if rng is not None:
            colour = colour + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3)
            if centres is None:
                ox, oy = rng.integers(-MAX_OFFSET, MAX_OFFSET + 1, 2)
                cx, cy = cx + ox, cy + oy
        mask = _shape_mask(obj.shape, cx * unit, cy * unit, HALF_EXTENT[obj.size] * unit, size)
        image[mask] = np.clip(colour, 0, 255)
    return image


def _pick(options: Sequence[str], rng: np.random.Generator) -> str:
    return options[rng.integers(len(options))]


def _word(value: str, rng: np.random.Generator) -> str:
    return _pick(SYNONYMS.get(value, (value,)), rng)


def _what(obj: ObjectSpec, rng: np.random.Generator) -> str:
    return f"{_word(obj.size, rng)} {_word(obj.colour, rng)} {_word(obj.shape, rng)}"


def _phrase(obj: ObjectSpec, rng: np.random.Generator, alone: bool) -> str:
    where = f"{_pick(POSITION_PHRASES[obj.position], rng)} {_word(obj.position, rng)}"
    what = _what(obj, rng)
    # "there is" only alone: keeps two-object captions within MAX_CAPTION_WORDS
    return _pick(OBJECT_TEMPLATES + ALONE_TEMPLATES if alone else OBJECT_TEMPLATES, rng).format(what=what, where=where)


def make_caption(objects: Sequence[ObjectSpec], rng: np.random.Generator) -> str:
    """A caption naming every object at its absolute position, in the given order, joined with "and"."""
    return " and ".join(_phrase(obj, rng, alone=len(objects) == 1) for obj in objects)


def make_relation_caption(subject: ObjectSpec, other: ObjectSpec, rng: np.random.Generator) -> str:
    """A caption naming both objects and `subject`'s position relative to `other` ("a small red circle
    left of a big blue square", or led by the relation: "to the left of a big blue box is a tiny red disc")."""
    relation = _pick(RELATION_PHRASES[subject.position], rng)
    a, b = _what(subject, rng), _what(other, rng)
    return _pick(RELATION_TEMPLATES, rng).format(a=a, b=b, relation=relation)


def _any(options) -> str:
    """A regular expression for any one of these word sequences (letters, spaces and {fields} only)."""
    return "(?:" + "|".join(options) + ")"


def _grammar() -> re.Pattern:
    """The captions make_caption and make_relation_caption can write, as one regular expression over words."""
    words = {name: _any(word for value in values for word in SYNONYMS.get(value, (value,)))
             for name, values in (("size", SIZES), ("colour", COLOURS), ("shape", SHAPES))}
    what = f"{words['size']} {words['colour']} {words['shape']}"
    where = _any(f"{phrase} {word}" for position, phrases in POSITION_PHRASES.items() for phrase in phrases
                 for word in SYNONYMS.get(position, (position,)))
    relation = _any(phrase for phrases in RELATION_PHRASES.values() for phrase in phrases)
    phrase = _any(OBJECT_TEMPLATES).format(what=what, where=where)
    captions = (_any(OBJECT_TEMPLATES + ALONE_TEMPLATES).format(what=what, where=where),
                f"{phrase} and {phrase}", _any(RELATION_TEMPLATES).format(a=what, b=what, relation=relation))
    return re.compile(_any(captions))


def is_well_formed(caption: str) -> bool:
    """Whether a caption is a sentence of the data set's grammar: one the generator could have written (any
    synonyms, any template), for either scene; the words lowercased and single-spaced first."""
    return _GRAMMAR.fullmatch(" ".join(caption.lower().split())) is not None


def _sample_objects(rng: np.random.Generator, max_objects: int) -> tuple[ObjectSpec, ...]:
    if max_objects == 2 and rng.random() < TWO_OBJECT_PROBABILITY:
        positions = POSITION_PAIRS[rng.integers(len(POSITION_PAIRS))]
        colours = [COLOURS[i] for i in rng.choice(len(COLOURS), 2, replace=False)]
    else:
        positions = (POSITIONS[rng.integers(len(POSITIONS))],)
        colours = (COLOURS[rng.integers(len(COLOURS))],)
    return tuple(
        ObjectSpec(
            SHAPES[rng.integers(len(SHAPES))], colour, SIZES[rng.integers(len(SIZES))], position
        )
        for position, colour in zip(positions, colours)
    )


def _sample_relation(rng: np.random.Generator) -> tuple[ObjectSpec, ObjectSpec]:
    """A subject at a random relation to another object of a different colour (relative positions)."""
    relation = _pick(RELATIONS, rng)
    colours = [COLOURS[i] for i in rng.choice(len(COLOURS), 2, replace=False)]
    subject, other = (
        ObjectSpec(_pick(SHAPES, rng), colour, _pick(SIZES, rng), position)
        for colour, position in zip(colours, (relation, OPPOSITE[relation]))
    )
    return subject, other


def _relation_centres(
    subject: ObjectSpec, other: ObjectSpec, rng: np.random.Generator
) -> list[tuple[float, float]]:
    """Random box centres (x, y), in units of size / 32, that put `subject` clearly at its relative
    position to `other` and keep both inside the canvas (see EDGE_MARGIN, GAP, MAX_CROSS_RATIO)."""
    r = [HALF_EXTENT[subject.size], HALF_EXTENT[other.size]]
    low = [ri + EDGE_MARGIN for ri in r]
    high = [32 - ri - EDGE_MARGIN for ri in r]
    first, second = (0, 1) if subject.position in ("left", "top") else (1, 0)  # by coordinate along the axis
    distance = r[0] + r[1] + GAP
    along = [0.0, 0.0]
    along[first] = rng.uniform(low[first], high[second] - distance)
    along[second] = rng.uniform(along[first] + distance, high[second])
    spread = MAX_CROSS_RATIO * (along[second] - along[first])
    across = [rng.uniform(low[0], high[0]), 0.0]
    across[1] = rng.uniform(max(low[1], across[0] - spread), min(high[1], across[0] + spread))
    if subject.position in ("left", "right"):
        return list(zip(along, across))
    return list(zip(across, along))


def sample_at(
    index: int, seed: int = 0, size: int = 32, max_objects: int = 2, scene: str = "objects"
) -> DemoSample:
    """Sample `index` of the set (`seed`, `scene`); depends only on its arguments.

    A relations scene always has two objects, so it needs max_objects = 2.
    """
    if max_objects not in (1, 2):
        raise ValueError(f"max_objects must be 1 or 2, got {max_objects}")
    _check_scene(scene)
    rng = np.random.default_rng([seed, index])
    if scene == "objects":
        objects = _sample_objects(rng, max_objects)
        image = render(objects, size, rng)
        return DemoSample(f"demo-{seed}-{index:06d}", image, make_caption(objects, rng), objects)
    if max_objects != 2:
        raise ValueError(f"a relations scene has two objects, so max_objects must be 2, got {max_objects}")
    subject, other = _sample_relation(rng)
    image = render((subject, other), size, rng, _relation_centres(subject, other, rng))
    caption = make_relation_caption(subject, other, rng)
    return DemoSample(f"relations-{seed}-{index:06d}", image, caption, (subject, other))


def iter_samples(
    n: int, seed: int = 0, size: int = 32, max_objects: int = 2, scene: str = "objects"
) -> Iterator[DemoSample]:
    for index in range(n):
        yield sample_at(index, seed, size, max_objects, scene)


def generate(
    n: int, seed: int = 0, size: int = 32, max_objects: int = 2, scene: str = "objects"
) -> list[DemoSample]:
    return list(iter_samples(n, seed, size, max_objects, scene))


def _label(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels of a boolean mask (0 = background)."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    while True:
        grown = labels.copy()  # 3x3 max filter, done as a vertical then a horizontal pass
        grown[1:] = np.maximum(grown[1:], labels[:-1])
        grown[:-1] = np.maximum(grown[:-1], labels[1:])
        vertical = grown.copy()
        grown[:, 1:] = np.maximum(grown[:, 1:], vertical[:, :-1])
        grown[:, :-1] = np.maximum(grown[:, :-1], vertical[:, 1:])
        grown *= mask
        if np.array_equal(grown, labels):
            return labels
        labels = grown


def _classify_pixels(image: np.ndarray) -> np.ndarray:
    """HxW index into COLOURS of each pixel's nearest palette colour, -1 for background."""
    pixels = image.astype(np.float64)
    top, bottom = pixels.max(axis=-1), pixels.min(axis=-1)
    chroma = pixels / np.maximum(top, 1)[..., None]
    palette = np.array([PALETTE[c] for c in COLOURS], np.float64)
    palette /= palette.max(axis=-1, keepdims=True)
    distance = np.linalg.norm(chroma[..., None, :] - palette, axis=-1)
    nearest = distance.argmin(axis=-1)
    foreground = (
        (top >= MIN_BRIGHTNESS)
        & ((top - bottom) >= MIN_SATURATION * top)
        & (distance.min(axis=-1) <= MAX_CHROMA_DISTANCE)
    )
    return np.where(foreground, nearest, -1)


def _box(shape: str, area: int, cx: float, cy: float) -> tuple[float, float, float]:
    """Box centre and half-extent at which `shape` has this pixel area and centroid."""
    r = np.sqrt(area / SHAPE_FILL[shape]) / 2
    if shape == "triangle":  # its centroid lies r / 3 below its box centre
        cy -= r / 3
    return cx, cy, r


def _describe(blob: np.ndarray, colour: str) -> tuple[ObjectSpec, tuple[float, float]]:
    """Attributes of one connected blob (HxW mask), without a position, and its box centre (x, y) in
    units of size / 32.

    Shape: the one whose template of the same area and centroid overlaps the blob best (IoU);
    size: from the area; box centre: the fitted template's.
    """
    ys, xs = np.nonzero(blob)
    area, cx, cy = len(ys), xs.mean() + 0.5, ys.mean() + 0.5
    boxes = {shape: _box(shape, area, cx, cy) for shape in SHAPES}

    def iou(shape: str) -> float:
        template = _shape_mask(shape, *boxes[shape], blob.shape[0])
        return (template & blob).sum() / (template | blob).sum()

    shape = max(SHAPES, key=iou)
    unit = blob.shape[0] / 32
    bx, by, r = (v / unit for v in boxes[shape])
    size = "large" if r > np.sqrt(HALF_EXTENT["small"] * HALF_EXTENT["large"]) else "small"
    return ObjectSpec(shape, colour, size, None), (bx, by)


def _nearest_position(centre: tuple[float, float]) -> str:
    return min(POSITIONS, key=lambda p: (CENTRES[p][0] - centre[0]) ** 2 + (CENTRES[p][1] - centre[1]) ** 2)


def _relative_positions(centres: Sequence[tuple[float, float]]) -> list[str | None]:
    """Two objects' positions relative to each other, along the axis their centres differ most on;
    None for each unless there are exactly two."""
    if len(centres) != 2:
        return [None] * len(centres)
    (x0, y0), (x1, y1) = centres
    if abs(x1 - x0) >= abs(y1 - y0):
        first = "left" if x0 < x1 else "right"
    else:
        first = "top" if y0 < y1 else "bottom"
    return [first, OPPOSITE[first]]


def read_attributes(image: np.ndarray, scene: str = "objects") -> tuple[ObjectSpec, ...]:
    """Objects found in an HxWx3 image (uint8, or float in [0, 1]), in canonical position order.

    Bright, saturated pixels are classified to their nearest palette colour; each 8-connected
    blob of one colour larger than a speck is an object (see `_describe`). Returns () if none.
    Positions as the scene defines them: "objects", the nearest of CENTRES; "relations", relative
    to each other (see `_relative_positions`).
    """
    _check_scene(scene)
    image = np.asarray(image)
    if image.dtype.kind == "f":
        image = np.clip(image, 0, 1) * 255
    unit = image.shape[0] / 32
    min_area = MIN_AREA * unit**2
    classes = _classify_pixels(image)
    found = []
    for index, colour in enumerate(COLOURS):
        mask = classes == index
        if mask.sum() < min_area:
            continue
        labels = _label(mask)
        for label in np.unique(labels[labels > 0]):
            blob = labels == label
            if blob.sum() >= min_area:
                found.append(_describe(blob, colour))
    centres = [centre for _, centre in found]
    positions = _relative_positions(centres) if scene == "relations" else map(_nearest_position, centres)
    return _canonical([replace(obj, position=p) for (obj, _), p in zip(found, positions)])


# Caption word -> (attribute, canonical value).
_WORDS = {
    word: (attribute, value)
    for attribute, values in zip(ATTRIBUTES, (SHAPES, COLOURS, SIZES, POSITIONS))
    for value in values
    for word in SYNONYMS.get(value, (value,))
}
# Relation phrase as words -> the relative position it gives the object it describes.
_RELATION_WORDS = [(phrase.split(), relation) for relation, phrases in RELATION_PHRASES.items() for phrase in phrases]


def _words(caption: str | Sequence[str]) -> list[str]:
    words = caption.split() if isinstance(caption, str) else list(caption)
    return [re.sub(r"[^a-z]", "", word.lower()) for word in words]


def _find_relation(words: list[str]) -> tuple[int, int, str] | None:
    """(start, stop, relation) of the first relation phrase in the words, None if there is none."""
    for start in range(len(words)):
        for phrase, relation in _RELATION_WORDS:
            if words[start:start + len(phrase)] == phrase:
                return start, start + len(phrase), relation
    return None


def _split_objects(words: list[str], separators: tuple[str, ...]) -> list[ObjectSpec]:
    """Objects named by runs of words between separators; the first word naming an attribute sets it."""
    objects, current = [], {}
    for word in [*words, separators[0]]:
        if word in separators:
            if current:
                objects.append(ObjectSpec(**{a: current.get(a) for a in ATTRIBUTES}))
            current = {}
        elif word in _WORDS:
            field, value = _WORDS[word]
            current.setdefault(field, value)
    return objects


def scene_of(caption: str | Sequence[str]) -> str:
    """"relations" when the caption states a relation between objects, else "objects"."""
    return "objects" if _find_relation(_words(caption)) is None else "relations"


def parse_caption(caption: str | Sequence[str]) -> tuple[ObjectSpec, ...]:
    """Objects named in a caption, in caption order; attributes it does not name are None.

    Objects are split on "and"; synonyms map to canonical names; other words are ignored. A relation
    caption is split at its first relation phrase (and at "is": "above a blue box is a red disc"): the
    object it describes (the last one before the phrase, else the second after it) gets the relation's
    position, the object after the phrase the opposite one.
    """
    words = _words(caption)
    found = _find_relation(words)
    if found is None:
        return tuple(_split_objects(words, ("and",)))
    start, stop, relation = found
    before = _split_objects(words[:start], ("and", "is"))
    objects = before + _split_objects(words[stop:], ("and", "is"))
    subject, other = (len(before) - 1, len(before)) if before else (1, 0)
    for index, position in ((subject, relation), (other, OPPOSITE[relation])):
        if index < len(objects):
            objects[index] = replace(objects[index], position=position)
    return tuple(objects)


def _match(
    predicted: Sequence[ObjectSpec], truth: Sequence[ObjectSpec]
) -> list[tuple[ObjectSpec, ObjectSpec]]:
    """(truth, predicted) pairs: same position first, then the rest in order."""
    remaining = list(predicted)
    pairs, unmatched = [], []
    for t in truth:
        same = [p for p in remaining if t.position is not None and p.position == t.position]
        if same:
            remaining.remove(same[0])
            pairs.append((t, same[0]))
        else:
            unmatched.append(t)
    return pairs + list(zip(unmatched, remaining))


def score(predicted: Sequence[ObjectSpec], truth: Sequence[ObjectSpec]) -> dict[str, float]:
    """Per-attribute accuracy of one prediction, and "all" (1.0 only if everything is right).

    Each attribute's accuracy is the number of matched objects that get it right over the
    larger of the two object counts, so missing and extra objects both count as wrong.
    """
    count = max(len(predicted), len(truth))
    if count == 0:
        return {name: 1.0 for name in (*ATTRIBUTES, "all")}
    pairs = _match(predicted, truth)
    result = {a: sum(getattr(t, a) == getattr(p, a) for t, p in pairs) / count for a in ATTRIBUTES}
    everything_right = all(result[a] == 1.0 for a in ATTRIBUTES)
    result["all"] = float(len(predicted) == len(truth) and everything_right)
    return result


def score_image(image: np.ndarray, caption: str) -> dict[str, float]:
    """`score` of the objects read from an image against the caption it should show, reading positions
    as the caption states them: relative to each other for a relation caption, else absolute."""
    return score(read_attributes(image, scene_of(caption)), parse_caption(caption))


def score_caption(generated: str, truth: str) -> dict[str, float]:
    """`score` of the objects a generated caption names against those of the true caption."""
    return score(parse_caption(generated), parse_caption(truth))


_GRAMMAR = _grammar()
