"""A synthetic image-caption corpus of coloured shapes, deterministic from a seed.

Each image holds one group of identical shapes (count, size, colour, shape) in one region (position),
on a pale background with a little grey clutter; its caption comes from a small grammar:

    "two small red circles on the left"

The held-out split holds colour-shape combinations that never occur in training images, so a model
that captions them right has composed attributes rather than memorised pairs. The caption *text* of
every combination is fair game for pre-training the language model (a frozen LLM knows the words
"red triangle" from text, as OPT does), see `all_captions`.
"""

from __future__ import annotations

import itertools
import math
import random
import re

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (35, 70, 225), "yellow": (235, 200, 20)}
COUNTS = ("one", "two", "three")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom")
HELD_OUT_PAIRS = {("red", "triangle"), ("green", "circle"), ("blue", "square")}
BACKGROUNDS = [(250, 250, 250), (236, 236, 236), (245, 240, 225), (228, 236, 245)]
ATTRIBUTES = ("shape", "color", "count", "position", "size")


def caption(a: dict) -> str:
    noun = a["shape"] + ("s" if a["count"] != "one" else "")
    return f"{a['count']} {a['size']} {a['color']} {noun} on the {a['position']}"


CAPTION_RE = re.compile(
    r"\b(one|two|three)\s+(small|large)\s+(red|green|blue|yellow)\s+"
    r"(circle|square|triangle)s?\s+on\s+the\s+(left|right|top|bottom)\b"
)


def parse_caption(text: str) -> dict | None:
    """Attributes named by a caption, or None if it does not follow the grammar."""
    m = CAPTION_RE.search(text.lower())
    if not m:
        return None
    count, size, color, shape, position = m.groups()
    return {"shape": shape, "color": color, "count": count, "position": position, "size": size}


def all_attribute_sets() -> list[dict]:
    return [
        dict(zip(("shape", "color", "count", "size", "position"), combo))
        for combo in itertools.product(SHAPES, COLORS, COUNTS, SIZES, POSITIONS)
    ]


def all_captions() -> list[str]:
    """Every caption the grammar can produce: text for pre-training the language model."""
    return [caption(a) for a in all_attribute_sets()]


def is_held_out(a: dict) -> bool:
    return (a["color"], a["shape"]) in HELD_OUT_PAIRS


def _region(position: str, size: int) -> tuple[int, int, int, int]:
    """The box a group is drawn in: 40% of the image on one side, within the middle band across,
    so that "left" and "top" groups never look alike."""
    near, band0, band1 = round(size * 0.42), round(size * 0.27), round(size * 0.73)
    far = size - near
    return {
        "left": (0, band0, near, band1),
        "right": (far, band0, size, band1),
        "top": (band0, 0, band1, near),
        "bottom": (band0, far, band1, size),
    }[position]


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.9
        d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        pts = [
            (cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))) for a in (-90, 30, 150)
        ]
        d.polygon(pts, fill=fill)


def layout(a: dict, rng: random.Random, size: int = 64) -> tuple[list[tuple[float, float]], float]:
    """Centres and radius of the group's shapes.

    Centres fall inside the position's region with a visible gap between shapes (rejection sampling);
    where the region is too small for that (three large shapes), the shapes stand as a pair or
    triangle at a random angle around the region's centre, kept inside the image. Touching shapes
    would make the count unreadable: two large squares side by side are one rectangle."""
    x0, y0, x1, y1 = _region(a["position"], size)
    n = COUNTS.index(a["count"]) + 1
    r = (size / 16 if a["size"] == "small" else size / 9.5) * rng.uniform(0.9, 1.1)
    gap = 2.5 * r  # centre to centre
    centres: list[tuple[float, float]] = []
    for _ in range(300):
        if len(centres) == n:
            return centres, r
        c = (rng.uniform(x0 + r + 1, x1 - r - 1), rng.uniform(y0 + r + 1, y1 - r - 1))
        if all(math.dist(c, o) > gap for o in centres):
            centres.append(c)
    if len(centres) == n:
        return centres, r
    spread = gap / (2 * math.sin(math.pi / n)) + 0.01  # n >= 2 here: one shape always fits
    edge = spread + r + 1
    cx = min(max((x0 + x1) / 2, edge), size - edge)
    cy = min(max((y0 + y1) / 2, edge), size - edge)
    turn = rng.uniform(0, 2 * math.pi)
    return [
        (
            cx + spread * math.cos(turn + 2 * math.pi * k / n),
            cy + spread * math.sin(turn + 2 * math.pi * k / n),
        )
        for k in range(n)
    ], r


def render(a: dict, rng: random.Random, size: int = 64, rgb: tuple | None = None) -> Image.Image:
    """The image of attribute set `a`; `rgb` paints the shapes in that colour instead of a["color"]."""
    img = Image.new("RGB", (size, size), rng.choice(BACKGROUNDS))
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 5)):  # clutter: short grey strokes
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        g = rng.randint(150, 200)
        d.line([x, y, x + rng.uniform(-4, 4), y + rng.uniform(-4, 4)], fill=(g, g, g), width=1)
    centres, r = layout(a, rng, size)
    jitter = lambda c: tuple(max(0, min(255, v + rng.randint(-12, 12))) for c_ in [c] for v in c_)
    for cx, cy in centres:
        _draw_shape(d, a["shape"], cx, cy, r, jitter(rgb or COLORS[a["color"]]))
    return img


def generate(n_train: int, n_heldout: int, seed: int = 0, size: int = 64):
    """Yields (split, index, attributes, caption, image); deterministic from `seed`."""
    rng = random.Random(seed)
    sets = all_attribute_sets()
    train_sets = [a for a in sets if not is_held_out(a)]
    held_sets = [a for a in sets if is_held_out(a)]
    for split, pool, n in (("train", train_sets, n_train), ("heldout", held_sets, n_heldout)):
        for i in range(n):
            a = dict(pool[rng.randrange(len(pool))])
            yield split, i, a, caption(a), render(a, rng, size)
