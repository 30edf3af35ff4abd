"""A generated referring-segmentation set: coloured shapes and an expression that singles one out.

Not from the papers: a stand-in for RefCOCO that a tiny model can learn in minutes on CPU, used by the
demo and the end-to-end tests. Each image holds `min_objects..max_objects` non-overlapping objects that
differ in shape (circle, square, triangle), colour (red, green, blue, yellow, purple), size (small, large)
and position, on a plain or mildly textured low-saturation background. The target is drawn at random and
described by an expression true of it alone, e.g. 'the small red circle', 'the leftmost triangle', 'the
blue object'; "distractor_sentence" describes exactly one *other* object of the same image (swapping the
two must change the answer). Example i depends only on (seed, i).

`matching_objects(sentence, objects)` parses an expression back and evaluates it on the object list; it
shares no code with the generator's choice of expressions, so a test can check the generator with it.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 50, 200),
}
SIZES = ("small", "large")
DIRECTIONS = ("leftmost", "rightmost", "topmost", "bottommost")
MARGIN = 0.10  # superlatives need the winner ahead of the runner-up by this fraction of the image size
EXTENT = {"circle": 1.0, "square": 1.2, "triangle": 1.3}  # vertex radius / nominal radius (similar areas)


def _direction_key(direction: str, obj: dict[str, Any]) -> float:
    """Smaller is 'more' in `direction` (x, y in pixels, y downwards)."""
    return {"leftmost": obj["cx"], "rightmost": -obj["cx"], "topmost": obj["cy"], "bottommost": -obj["cy"]}[direction]


class SyntheticRefer:
    """Random-access source of synthetic referring examples (see module docstring).

    Each example: "image" uint8 (S, S, 3), "mask" uint8 (S, S) {0,1}, "sentence", "distractor_sentence",
    "image_id" = ref_id = sent_id = i, "ann_id" = 16 * i + index of the target object.
    """

    def __init__(
        self, num_examples: int, image_size: int = 128, seed: int = 0, min_objects: int = 2, max_objects: int = 4
    ):
        if num_examples <= 0:
            raise ValueError(f"num_examples must be positive, got {num_examples}")
        if not 2 <= min_objects <= max_objects <= 6:
            raise ValueError(f"need 2 <= min_objects <= max_objects <= 6, got {min_objects}, {max_objects}")
        if image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {image_size}")
        self.num_examples = num_examples
        self.image_size = image_size
        self.seed = seed
        self.min_objects = min_objects
        self.max_objects = max_objects

    def __len__(self) -> int:
        return self.num_examples

    def __repr__(self) -> str:
        return (
            f"SyntheticRefer(num_examples={self.num_examples}, image_size={self.image_size}, seed={self.seed}, "
            f"min_objects={self.min_objects}, max_objects={self.max_objects})"
        )

    def scene(self, index: int) -> dict[str, Any]:
        """Everything about example `index`: objects, target/distractor indices and sentences, image, masks."""
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self!r}")
        rng = np.random.default_rng([self.seed, index])
        while True:
            objects = self._place_objects(rng)
            choice = self._pick(objects, rng)
            if choice is not None:
                break
        target, sentence, distractor, distractor_sentence = choice
        image, masks = self._render(objects, rng)
        return {
            "objects": objects,
            "target": target,
            "sentence": sentence,
            "distractor": distractor,
            "distractor_sentence": distractor_sentence,
            "image": image,
            "object_masks": masks,
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        s = self.scene(index)
        return {
            "image": s["image"],
            "mask": s["object_masks"][s["target"]],
            "sentence": s["sentence"],
            "distractor_sentence": s["distractor_sentence"],
            "image_id": index,
            "ann_id": 16 * index + s["target"],
            "ref_id": index,
            "sent_id": index,
        }

    # -- scene generation ---------------------------------------------------------------------------------
    def _place_objects(self, rng: np.random.Generator) -> list[dict[str, Any]]:
        s = self.image_size
        n = int(rng.integers(self.min_objects, self.max_objects + 1))
        while True:
            objects: list[dict[str, Any]] = []
            for _ in range(200):
                size = SIZES[int(rng.integers(2))]
                shape = SHAPES[int(rng.integers(len(SHAPES)))]
                r = s * (rng.uniform(0.09, 0.11) if size == "small" else rng.uniform(0.15, 0.18))
                ext = r * EXTENT[shape]
                cx, cy = rng.uniform(ext + 1, s - ext - 1, size=2)
                if all(np.hypot(cx - o["cx"], cy - o["cy"]) > ext + o["extent"] + 0.03 * s for o in objects):
                    color = list(COLORS)[int(rng.integers(len(COLORS)))]
                    angle = float(rng.uniform(-15, 15))
                    obj = dict(shape=shape, color=color, size=size, cx=cx, cy=cy, r=r, extent=ext, angle=angle)
                    objects.append(obj)
                    if len(objects) == n:
                        return objects
            # crowded: start over

    def _unique_expressions(self, objects: list[dict[str, Any]], t: int) -> list[str]:
        """All expressions of the grammar whose referent set is exactly {t} (set logic over attributes)."""
        out = []
        target = objects[t]
        for use_size, use_color, use_shape in itertools.product((False, True), repeat=3):
            if not (use_size or use_color or use_shape):
                continue
            same = [
                i
                for i, o in enumerate(objects)
                if (not use_size or o["size"] == target["size"])
                and (not use_color or o["color"] == target["color"])
                and (not use_shape or o["shape"] == target["shape"])
            ]
            words = [target["size"]] * use_size + [target["color"]] * use_color
            noun = target["shape"] if use_shape else "object"
            if same == [t]:
                out.append(" ".join(["the", *words, noun]))
            if use_size or len(same) < 2:
                continue  # superlatives only over colour/shape groups of two or more
            for d in DIRECTIONS:
                keys = sorted((_direction_key(d, objects[i]), i) for i in same)
                if keys[0][1] == t and keys[1][0] - keys[0][0] >= MARGIN * self.image_size:
                    out.append(" ".join(["the", d, *words, noun]))
        for d in DIRECTIONS:  # over all objects
            keys = sorted((_direction_key(d, o), i) for i, o in enumerate(objects))
            if keys[0][1] == t and keys[1][0] - keys[0][0] >= MARGIN * self.image_size:
                out.append(f"the {d} object")
        return sorted(set(out))

    def _pick(self, objects: list[dict[str, Any]], rng: np.random.Generator) -> tuple[int, str, int, str] | None:
        exprs = [self._unique_expressions(objects, i) for i in range(len(objects))]
        target = int(rng.integers(len(objects)))
        others = [i for i in range(len(objects)) if i != target and exprs[i]]
        if not exprs[target] or not others:
            return None
        distractor = others[int(rng.integers(len(others)))]
        sentence = exprs[target][int(rng.integers(len(exprs[target])))]
        distractor_sentence = exprs[distractor][int(rng.integers(len(exprs[distractor])))]
        return target, sentence, distractor, distractor_sentence

    def _render(self, objects: list[dict[str, Any]], rng: np.random.Generator) -> tuple[np.ndarray, list]:
        s = self.image_size
        base = rng.uniform(70, 190) + rng.uniform(-12, 12, size=3)  # low-saturation grey
        img = np.broadcast_to(base, (s, s, 3)).astype(np.float32).copy()
        if rng.random() < 0.5:  # mild texture: smooth stripes plus noise
            yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
            theta, freq = rng.uniform(0, np.pi), rng.uniform(2, 6) * 2 * np.pi / s
            img += 10 * np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy))[..., None]
            img += rng.normal(0, 4, size=(s, s, 3)).astype(np.float32)
        masks = []
        for o in objects:
            m = _shape_mask(o, s)
            colour = np.asarray(COLORS[o["color"]], np.float32) + rng.uniform(-15, 15, size=3).astype(np.float32)
            img[m.astype(bool)] = colour
            masks.append(m)
        return np.clip(np.round(img), 0, 255).astype(np.uint8), masks


def _shape_mask(o: dict[str, Any], s: int) -> np.ndarray:
    """uint8 {0,1} (s, s) mask of one object (fixed-point vertices, 8-connected fill, no anti-aliasing)."""
    m = np.zeros((s, s), np.uint8)
    shift = 4
    scale = 1 << shift
    if o["shape"] == "circle":
        center = (round(o["cx"] * scale), round(o["cy"] * scale))
        cv2.circle(m, center, round(o["r"] * scale), 1, thickness=-1, lineType=cv2.LINE_8, shift=shift)
        return m
    if o["shape"] == "square":
        angles = np.deg2rad(o["angle"] + np.array([45, 135, 225, 315]))
    else:  # triangle, pointing up
        angles = np.deg2rad(o["angle"] + np.array([-90, 30, 150]))
    radius = o["extent"]
    pts = np.stack([o["cx"] + radius * np.cos(angles), o["cy"] + radius * np.sin(angles)], -1)
    cv2.fillPoly(m, [np.round(pts * scale).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=shift)
    return m


_GRAMMAR = re.compile(
    r"^the(?: (?P<dir>leftmost|rightmost|topmost|bottommost))?(?: (?P<size>small|large))?"
    r"(?: (?P<color>red|green|blue|yellow|purple))?(?: (?P<noun>circle|square|triangle|object))$"
)


def matching_objects(sentence: str, objects: Sequence[dict[str, Any]], image_size: int | None = None) -> list[int]:
    """Indices of the objects the expression is true of (parsed back from the text).

    Superlatives ('the leftmost red object') hold for the extreme object of the described group when no
    other group member is within `MARGIN * image_size` of it (all near-ties are returned otherwise); with
    `image_size=None` the size is inferred as 1 (any strict winner counts). Raises ValueError on a sentence
    outside the grammar.
    """
    m = _GRAMMAR.match(sentence)
    if m is None:
        raise ValueError(f"sentence outside the synthetic grammar: {sentence!r}")
    group = [
        i
        for i, o in enumerate(objects)
        if (m["size"] is None or o["size"] == m["size"])
        and (m["color"] is None or o["color"] == m["color"])
        and (m["noun"] == "object" or o["shape"] == m["noun"])
    ]
    if m["dir"] is None or not group:
        return group
    axis, sign = {"leftmost": ("cx", 1), "rightmost": ("cx", -1), "topmost": ("cy", 1), "bottommost": ("cy", -1)}[
        m["dir"]
    ]
    values = {i: sign * objects[i][axis] for i in group}
    best = min(values.values())
    tol = MARGIN * (image_size or 1)
    return [i for i in group if values[i] - best < tol]
