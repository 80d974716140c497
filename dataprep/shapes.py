"""The built-in demo data set: captioned synthetic shape images, plus readers to score models with.

Each image is a black square with one or two coloured shapes; its caption names each object's
size, colour, shape and position ("a small red circle on the left and a big blue box on the
right"). Every sample is a pure function of (seed, index), so a set can be built in parallel chunks.

Two deterministic readers turn model outputs back into attributes for scoring:

* ``read_attributes`` recovers the objects from pixels (text -> image: compare with the prompt);
* ``parse_caption`` recovers them from caption words (image -> text: compare with the image).

``score`` compares a prediction with the truth, attribute by attribute.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
ATTRIBUTES = ("shape", "colour", "size", "position")
# Accuracy of a uniform random guess of one object's attribute: the bar a trained model must clear.
CHANCE = {name: 1 / len(values) for name, values in zip(ATTRIBUTES, (SHAPES, COLOURS, SIZES, POSITIONS))}

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
    objects: tuple[ObjectSpec, ...]


def _canonical(objects: Sequence[ObjectSpec]) -> tuple[ObjectSpec, ...]:
    """Objects sorted by position (POSITIONS order)."""
    return tuple(sorted(objects, key=lambda o: POSITIONS.index(o.position)))


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
    objects: Sequence[ObjectSpec], size: int = 32, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Draw the objects on black. With an rng, colours and centres get a small random jitter."""
    unit = size / 32
    image = np.zeros((size, size, 3), np.uint8)
    for obj in objects:
        colour = np.array(PALETTE[obj.colour])
        cx, cy = (c * unit for c in CENTRES[obj.position])
        if rng is not None:
            colour = colour + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3)
            ox, oy = rng.integers(-MAX_OFFSET, MAX_OFFSET + 1, 2) * unit
            cx, cy = cx + ox, cy + oy
        mask = _shape_mask(obj.shape, cx, cy, HALF_EXTENT[obj.size] * unit, size)
        image[mask] = np.clip(colour, 0, 255)
    return image


def _word(value: str, rng: np.random.Generator) -> str:
    options = SYNONYMS.get(value, (value,))
    return options[rng.integers(len(options))]


def _phrase(obj: ObjectSpec, rng: np.random.Generator, alone: bool) -> str:
    prepositions = POSITION_PHRASES[obj.position]
    where = f"{prepositions[rng.integers(len(prepositions))]} {_word(obj.position, rng)}"
    what = f"{_word(obj.size, rng)} {_word(obj.colour, rng)} {_word(obj.shape, rng)}"
    templates = [f"a {what} {where}", f"{what} {where}", f"{where} a {what}"]
    if alone:  # keeps two-object captions within MAX_CAPTION_WORDS
        templates.append(f"there is a {what} {where}")
    return templates[rng.integers(len(templates))]


def make_caption(objects: Sequence[ObjectSpec], rng: np.random.Generator) -> str:
    """A caption naming every object, in the given order, joined with "and"."""
    return " and ".join(_phrase(obj, rng, alone=len(objects) == 1) for obj in objects)


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


def sample_at(index: int, seed: int = 0, size: int = 32, max_objects: int = 2) -> DemoSample:
    """Sample `index` of the set `seed`; depends only on its arguments."""
    if max_objects not in (1, 2):
        raise ValueError(f"max_objects must be 1 or 2, got {max_objects}")
    rng = np.random.default_rng([seed, index])
    objects = _sample_objects(rng, max_objects)
    image = render(objects, size, rng)
    return DemoSample(f"demo-{seed}-{index:06d}", image, make_caption(objects, rng), objects)


def iter_samples(
    n: int, seed: int = 0, size: int = 32, max_objects: int = 2
) -> Iterator[DemoSample]:
    for index in range(n):
        yield sample_at(index, seed, size, max_objects)


def generate(n: int, seed: int = 0, size: int = 32, max_objects: int = 2) -> list[DemoSample]:
    return list(iter_samples(n, seed, size, max_objects))


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


def _describe(blob: np.ndarray, colour: str) -> ObjectSpec:
    """Attributes of one connected blob (HxW mask).

    Shape: the one whose template of the same area and centroid overlaps the blob best (IoU);
    size: from the area; position: the centre nearest to the fitted template's box centre.
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
    position = min(POSITIONS, key=lambda p: (CENTRES[p][0] - bx) ** 2 + (CENTRES[p][1] - by) ** 2)
    return ObjectSpec(shape, colour, size, position)


def read_attributes(image: np.ndarray) -> tuple[ObjectSpec, ...]:
    """Objects found in an HxWx3 image (uint8, or float in [0, 1]), in canonical position order.

    Bright, saturated pixels are classified to their nearest palette colour; each 8-connected
    blob of one colour larger than a speck is an object (see `_describe`). Returns () if none.
    """
    image = np.asarray(image)
    if image.dtype.kind == "f":
        image = np.clip(image, 0, 1) * 255
    unit = image.shape[0] / 32
    min_area = MIN_AREA * unit**2
    classes = _classify_pixels(image)
    objects = []
    for index, colour in enumerate(COLOURS):
        mask = classes == index
        if mask.sum() < min_area:
            continue
        labels = _label(mask)
        for label in np.unique(labels[labels > 0]):
            blob = labels == label
            if blob.sum() >= min_area:
                objects.append(_describe(blob, colour))
    return _canonical(objects)


# Caption word -> (attribute, canonical value).
_WORDS = {
    word: (attribute, value)
    for attribute, values in zip(ATTRIBUTES, (SHAPES, COLOURS, SIZES, POSITIONS))
    for value in values
    for word in SYNONYMS.get(value, (value,))
}


def parse_caption(caption: str | Sequence[str]) -> tuple[ObjectSpec, ...]:
    """Objects named in a caption, in caption order; attributes it does not name are None.

    Objects are split on "and"; synonyms map to canonical names; other words are ignored.
    """
    words = caption.split() if isinstance(caption, str) else list(caption)
    words = [re.sub(r"[^a-z]", "", word.lower()) for word in words]
    objects, current = [], {}
    for word in [*words, "and"]:
        if word == "and":
            if current:
                objects.append(ObjectSpec(**{a: current.get(a) for a in ATTRIBUTES}))
            current = {}
        elif word in _WORDS:
            field, value = _WORDS[word]
            current.setdefault(field, value)
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
