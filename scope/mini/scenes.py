"""Deterministic procedural scenes for SynthBench and MiniLLaVA.

A scene is a few large, salient shapes and several small ones on a low-contrast textured background; some
large shapes carry a digit glyph. Scenes are rendered at ``RENDER_SIZE`` (384 px) and downsampled for the
model (192 px for MiniLLaVA), so fine detail (small shapes, glyphs) is partly lost at single-crop
resolution -- which is what higher-resolution LLaVA-NeXT crops buy back. Seed ranges reserved for evaluation
draw the digits (``SMALL_TEXT_SEED_BASE``) or the small shapes (``TINY_SEED_BASE``) at half size.

Everything is a pure function of an integer seed: ``make_scene(seed)`` gives the same scene on every
machine (numpy ``default_rng`` + Pillow drawing, font = Pillow's built-in FreeType font).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

RENDER_SIZE = 384
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 85, 225),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "orange": (250, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
DIGITS = ("2", "3", "4", "5", "7", "8")
# Scenes whose seed is at least SMALL_TEXT_SEED_BASE draw their digits at SMALL_TEXT times the usual size:
# ink 10-16 px tall at 384 px (the usual: 19-40), so 5-8 px -- a patch or less -- in MiniLLaVA's 192 px view,
# and 10-16 px in LLaVA-NeXT's full-resolution grid crops, the size MiniLLaVA reads its usual digits at. Only
# the test split's "small text" reading questions use such seeds; training and validation scenes (seeds
# below 1e9) never hold small text.
SMALL_TEXT_SEED_BASE = 2_000_000_000
SMALL_TEXT = 0.5
# Scenes whose seed is at least TINY_SEED_BASE draw their small shapes at TINY times the usual half-size
# (radius 5-8 px at 384 px, so 3-4 px in a 192 px view; the usual small shapes show that size in LLaVA-NeXT's
# full-resolution crops); the layout is the same as with the usual size. Used by the "detail" split only.
TINY_SEED_BASE = 3_000_000_000
TINY = 0.5
# Skewed sampling weights: some colour/shape combinations are "popular" (frequent across the dataset),
# which is what POPE's popular negatives exploit.
COLOR_WEIGHTS = np.array([0.26, 0.2, 0.18, 0.14, 0.12, 0.1])
SHAPE_WEIGHTS = np.array([0.34, 0.28, 0.22, 0.16])


@dataclass
class Obj:
    """One shape in a scene, geometry in render-resolution pixels."""

    color: str
    shape: str
    x: float  # centre
    y: float
    r: float  # half-size
    large: bool
    glyph: str = ""  # digit drawn on the object, "" for none
    text_size: float = 1.0  # digit size relative to the usual (SMALL_TEXT for small-text scenes)

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    seed: int
    objects: list[Obj] = field(default_factory=list)
    bg: tuple = ()  # background parameters, drawn from the same seed


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def make_scene(seed: int, n_large: tuple[int, int] = (2, 3), n_small: tuple[int, int] = (3, 6)) -> Scene:
    """Sample the layout of scene ``seed``: distinct colour/shape combos, non-overlapping placement."""
    rng = np.random.default_rng(seed)
    s = RENDER_SIZE
    scene = Scene(seed=seed)
    k_large = int(rng.integers(n_large[0], n_large[1] + 1))
    k_small = int(rng.integers(n_small[0], n_small[1] + 1))
    used: set[tuple[str, str]] = set()
    for i in range(k_large + k_small):
        large = i < k_large
        for _ in range(200):  # rejection sampling: distinct combo, no overlap, inside the canvas
            color = str(rng.choice(list(COLORS), p=COLOR_WEIGHTS))
            shape = str(rng.choice(SHAPES, p=SHAPE_WEIGHTS))
            r = float(rng.uniform(0.1, 0.13) * s) if large else float(rng.uniform(0.028, 0.04) * s)
            x, y = (float(v) for v in rng.uniform(r + 4, s - r - 4, size=2))
            if (color, shape) in used:
                continue
            if any(math.hypot(x - o.x, y - o.y) < (r + o.r) * 1.15 + 6 for o in scene.objects):
                continue
            used.add((color, shape))
            scene.objects.append(Obj(color, shape, x, y, r, large))
            break
    larges = [o for o in scene.objects if o.large]
    n_glyph = int(rng.integers(1, min(2, len(larges)) + 1))
    for o in list(rng.permutation(len(larges)))[:n_glyph]:
        larges[int(o)].glyph = str(rng.choice(DIGITS))
        if SMALL_TEXT_SEED_BASE <= seed < TINY_SEED_BASE:  # no random draw: other scenes stay as they were
            larges[int(o)].text_size = SMALL_TEXT
    if seed >= TINY_SEED_BASE:  # shrunk after placement: no random draw, no new overlap
        for o in scene.objects:
            if not o.large:
                o.r *= TINY
    base = rng.uniform(105, 165, size=3)
    scene.bg = (
        tuple(float(v) for v in base),
        float(rng.uniform(0, math.pi)),
        int(rng.integers(0, 2**31 - 1)),
    )
    return scene


def _polygon(o: Obj) -> list[tuple[float, float]]:
    if o.shape == "square":
        q = o.r * 0.88
        return [(o.x - q, o.y - q), (o.x + q, o.y - q), (o.x + q, o.y + q), (o.x - q, o.y + q)]
    if o.shape == "triangle":
        return [(o.x + o.r * math.cos(a), o.y + o.r * math.sin(a)) for a in np.deg2rad([-90, 30, 150])]
    if o.shape == "diamond":
        return [(o.x, o.y - o.r), (o.x + o.r, o.y), (o.x, o.y + o.r), (o.x - o.r, o.y)]
    raise ValueError(f"shape={o.shape!r} has no polygon")


def glyph_anchor(o: Obj) -> tuple[float, int]:
    """(y of the glyph's middle, font size in px) of the digit drawn on ``o`` (centred at x = ``o.x``)."""
    tri = o.shape == "triangle"  # a triangle's glyph sits lower and smaller, inside its wide base
    return o.y + (o.r * 0.2 if tri else 0), int(o.r * (0.75 if tri else 0.95) * o.text_size)


def glyph_box(o: Obj) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1): the ink bounding box of ``o``'s digit in render pixels (``o`` must have a glyph)."""
    if not o.glyph:
        raise ValueError(f"object {o.name!r} has no glyph")
    cy, size_px = glyph_anchor(o)
    left, top, right, bottom = _font(size_px).getbbox(o.glyph, anchor="mm")
    return o.x + left, cy + top, o.x + right, cy + bottom


@functools.lru_cache(maxsize=4)
def _grid(s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row and column coordinates in [0, 1) and the horizontal gradient of an ``s`` px canvas (read-only)."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    grad = (xx - 0.5) * 24
    for a in (yy, xx, grad):
        a.setflags(write=False)
    return yy, xx, grad


def background(scene: Scene) -> Image.Image:
    """Low-contrast texture: tinted gradient + oriented stripes + pixel noise (all from the scene seed).

    The coordinate grids are cached and the sums run in place: the same float32 operations in the same
    order as ``base + (9 sin(...) + gradient) + noise``, so the pixels are bit-identical to the plain
    formula (tested), about 1.5-2x faster; the background is most of a stage-1 batch's rendering time.
    """
    s = RENDER_SIZE
    base, angle, noise_seed = scene.bg
    rng = np.random.default_rng(noise_seed)
    yy, xx, grad = _grid(s)
    texture = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi * 9)
    texture *= 9
    texture += grad
    noise = rng.normal(0, 7, size=(s, s, 1)).astype(np.float32)
    img = np.asarray(base, np.float32)[None, None] + texture[..., None]
    img += noise
    np.clip(img, 0, 255, out=img)
    return Image.fromarray(img.astype(np.uint8), "RGB")


def render(scene: Scene, size: int = RENDER_SIZE, with_ids: bool = False):
    """Draw ``scene`` and resize to ``size`` px; with ``with_ids`` also return the object-id map (0 = bg)."""
    img = background(scene)
    ids = Image.new("L", img.size, 0)
    draw, draw_ids = ImageDraw.Draw(img), ImageDraw.Draw(ids)
    for i, o in enumerate(scene.objects, start=1):
        fill = COLORS[o.color]
        for d, f in ((draw, fill), (draw_ids, i)):
            if o.shape == "circle":
                d.ellipse([o.x - o.r, o.y - o.r, o.x + o.r, o.y + o.r], fill=f)
            else:
                d.polygon(_polygon(o), fill=f)
        if o.glyph:
            ink = (20, 20, 20) if o.color in ("yellow", "orange", "green") else (250, 250, 250)
            cy, size_px = glyph_anchor(o)
            draw.text((o.x, cy), o.glyph, fill=ink, font=_font(size_px), anchor="mm")
    if size != RENDER_SIZE:
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    if not with_ids:
        return img
    return img, np.asarray(ids)
