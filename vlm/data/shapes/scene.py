"""Scenes of the ``shapes`` dataset: a few coloured shapes on a plain background, and their rendering.

Invariants every task relies on: within one image all shape *types* differ and all *colours* differ (so "the circle",
"the red shape" and "the red circle" each name exactly one shape), shapes never overlap or touch, and each shape
exactly fills its pixel box ``(x1, y1, x2, y2)`` (``x2``/``y2`` exclusive), so the box is the shape's tight extent.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 80, 230),
    "yellow": (245, 215, 20), "purple": (150, 50, 200), "orange": (250, 130, 10),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (245, 245, 245), "gray": (128, 128, 128),
                                                "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle", "cross", "star")
DEFAULT_SHAPES = ("circle", "square", "triangle", "cross")


@dataclass(frozen=True)
class Shape:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # pixels, (x1, y1, x2, y2), x2/y2 exclusive

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2

    def as_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "box": list(self.box)}


@dataclass(frozen=True)
class Scene:
    size: int
    background: str
    shapes: tuple[Shape, ...]
    noise: float = 0.0          # std of Gaussian pixel noise (0..255 units)
    gradient: float = 0.0       # peak brightness change of a linear background gradient (0..255 units)
    texture_seed: int = 0

    def types(self) -> set[str]:
        return {s.shape for s in self.shapes}

    def render(self, supersample: int = 4) -> Image.Image:
        """An RGB ``size x size`` image (shapes drawn at ``supersample`` x and box-filtered down: antialiased)."""
        k = supersample
        colors = {**COLORS, **BACKGROUNDS}
        img = Image.new("RGB", (self.size * k, self.size * k), colors[self.background])
        d = ImageDraw.Draw(img)
        for s in self.shapes:
            _draw(d, s.shape, [v * k for v in s.box], colors[s.color])
        if k > 1:
            img = img.resize((self.size, self.size), Image.Resampling.BOX)
        if self.noise > 0 or self.gradient > 0:
            rng = np.random.default_rng(self.texture_seed)
            a = np.asarray(img, dtype=np.float32)
            if self.gradient > 0:
                theta = rng.uniform(0, 2 * math.pi)
                yy, xx = np.mgrid[0:self.size, 0:self.size] / max(self.size - 1, 1) - 0.5
                a = a + (self.gradient * (np.cos(theta) * xx + np.sin(theta) * yy))[..., None]
            if self.noise > 0:
                a = a + rng.normal(0.0, self.noise, a.shape)
            img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "RGB")
        return img


def _star_points(x1: float, y1: float, x2: float, y2: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        r = 1.0 if i % 2 == 0 else 0.42
        a = -math.pi / 2 + i * math.pi / 5
        pts.append((r * math.cos(a), r * math.sin(a)))
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    lx, hx, ly, hy = min(xs), max(xs), min(ys), max(ys)  # stretch to fill the box exactly
    return [(x1 + (px - lx) / (hx - lx) * (x2 - x1), y1 + (py - ly) / (hy - ly) * (y2 - y1)) for px, py in pts]


def _draw(d: ImageDraw.ImageDraw, shape: str, box: Sequence[float], color: tuple[int, int, int]) -> None:
    x1, y1, x2, y2 = box
    x2, y2 = x2 - 1, y2 - 1  # PIL boxes are inclusive
    if shape == "circle":
        d.ellipse((x1, y1, x2, y2), fill=color)
    elif shape == "square":
        d.rectangle((x1, y1, x2, y2), fill=color)
    elif shape == "triangle":
        d.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=color)
    elif shape == "cross":
        t = (x2 - x1) / 3
        d.rectangle((x1, y1 + t, x2, y2 - t), fill=color)
        d.rectangle((x1 + t, y1, x2 - t, y2), fill=color)
    elif shape == "star":
        d.polygon(_star_points(x1, y1, x2, y2), fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


# ----------------------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class SceneConfig:
    size: int = 64
    shapes: tuple[str, ...] = DEFAULT_SHAPES
    colors: tuple[str, ...] = tuple(COLORS)
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    min_shapes: int = 1
    max_shapes: int = 4
    layout: str = "grid"        # "grid": one shape per cell of a grid x grid lattice; "free": anywhere
    grid: int = 3
    noise: float = 0.0
    gradient: float = 0.0

    def __post_init__(self) -> None:
        unknown = [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise ValueError(f"unknown shape(s) {unknown}; known: {list(SHAPES)}")
        bad = [c for c in self.colors if c not in COLORS] + [b for b in self.backgrounds if b not in BACKGROUNDS]
        if bad:
            raise ValueError(f"unknown colour(s) {bad}; shape colours: {list(COLORS)}, "
                             f"backgrounds: {list(BACKGROUNDS)}")
        cap = min(len(self.shapes), len(self.colors), self.grid ** 2 if self.layout == "grid" else 99)
        if not 1 <= self.min_shapes <= self.max_shapes <= cap:
            why = "distinct types and colours per image" + (", grid cells" if self.layout == "grid" else "")
            raise ValueError(f"need 1 <= min_shapes <= max_shapes <= {cap} ({why}); "
                             f"got {self.min_shapes}..{self.max_shapes}")
        if self.layout not in ("grid", "free"):
            raise ValueError(f"layout must be 'grid' or 'free'; got {self.layout!r}")
        if self.size < 16:
            raise ValueError(f"image size {self.size} is too small (>= 16)")
        if self.layout == "grid" and self.size // self.grid < 8:
            raise ValueError(f"grid {self.grid} leaves cells under 8 px in a {self.size} px image")


def _grid_boxes(rng: random.Random, cfg: SceneConfig, n: int) -> list[tuple[int, int, int, int]]:
    g, size = cfg.grid, cfg.size
    edges = [round(i * size / g) for i in range(g + 1)]
    cells = rng.sample([(r, c) for r in range(g) for c in range(g)], n)
    out = []
    for r, c in cells:
        cw = min(edges[c + 1] - edges[c], edges[r + 1] - edges[r]) - 2  # 1 px free on every cell side
        s = rng.randint(max(4, round(0.62 * (cw + 2))), cw)
        x = edges[c] + 1 + rng.randint(0, edges[c + 1] - edges[c] - 2 - s)
        y = edges[r] + 1 + rng.randint(0, edges[r + 1] - edges[r] - 2 - s)
        out.append((x, y, x + s, y + s))
    return out


def _free_boxes(rng: random.Random, cfg: SceneConfig, n: int) -> list[tuple[int, int, int, int]]:
    size, gap = cfg.size, 2
    lo, hi = max(6, round(0.18 * size)), max(6, round(0.3 * size))
    for _ in range(1000):
        out: list[tuple[int, int, int, int]] = []
        for _ in range(n):
            for _ in range(100):
                s = rng.randint(lo, hi)
                x, y = rng.randint(1, size - 1 - s), rng.randint(1, size - 1 - s)
                b = (x, y, x + s, y + s)
                if all(b[2] + gap <= o[0] or o[2] + gap <= b[0] or b[3] + gap <= o[1] or o[3] + gap <= b[1]
                       for o in out):
                    out.append(b)
                    break
            else:
                break
        if len(out) == n:
            return out
    raise RuntimeError(f"could not place {n} shapes in a {size} px image")  # pragma: no cover


def make_scene(rng: random.Random, cfg: SceneConfig, *, n: int | None = None, min_n: int | None = None,
               include: Sequence[str] = (), exclude: Sequence[str] = ()) -> Scene:
    """Sample a scene: ``n`` shapes (else uniform in ``[max(min_n, cfg.min_shapes), cfg.max_shapes]``) with distinct
    types (all of ``include``, none of ``exclude``) and distinct colours, on a random background."""
    types = [t for t in cfg.shapes if t not in exclude and t not in include]
    if n is None:
        lo, hi = max(cfg.min_shapes, min_n or 1, len(include)), min(cfg.max_shapes, len(types) + len(include))
        if lo > hi:
            raise ValueError(f"no scene with {lo}..{hi} shapes (include={list(include)}, exclude={list(exclude)}, "
                             f"shapes={list(cfg.shapes)}, min_shapes={cfg.min_shapes})")
        n = rng.randint(lo, hi)
    chosen = list(include) + rng.sample(types, n - len(include))
    rng.shuffle(chosen)
    colors = rng.sample(list(cfg.colors), n)
    boxes = _grid_boxes(rng, cfg, n) if cfg.layout == "grid" else _free_boxes(rng, cfg, n)
    bg = rng.choice(list(cfg.backgrounds))
    shapes = tuple(Shape(t, c, b) for t, c, b in zip(chosen, colors, boxes))
    return Scene(cfg.size, bg, shapes, cfg.noise, cfg.gradient, rng.getrandbits(32))
