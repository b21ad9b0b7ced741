"""The miniature world: 16 named shapes drawn with random colours, sizes and rotations on textured backgrounds.

    python -c "from tools.toy.world import demo_sheet; demo_sheet('logs/toy_sheet.png')"   # a look at it

Every shape is a stack of filled polygons (holes are polygons filled with 0), rasterised without
anti-aliasing, so an object's pixels are exactly its mask and its box is exactly the mask's extent.
Scenes are functions of a `numpy.random.Generator`: the same generator state gives the same image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw


@dataclass(frozen=True)
class ToyClass:
    id: int
    name: str
    split: str  # "base": boxes are annotated for training; "novel": known to the detector by name only


# Category ids 1..16 in this order; every name is an ordinary English word of CLIP's BPE vocabulary.
CLASSES: tuple[ToyClass, ...] = tuple(
    ToyClass(i + 1, name, "novel" if name in ("heart", "arrow", "crescent", "lightning") else "base")
    for i, name in enumerate((
        "circle", "square", "triangle", "star", "heart", "ring", "cross", "arrow",
        "hexagon", "diamond", "crescent", "flower", "house", "lightning", "hourglass", "pentagon",
    ))
)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)
BASE_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES if c.split == "base")
NOVEL_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES if c.split == "novel")

# Saturated object colours with the words captions use for them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30),
    "orange": (245, 130, 20), "purple": (140, 40, 180), "pink": (245, 110, 180), "white": (245, 245, 245),
    "black": (15, 15, 15), "brown": (120, 70, 30), "cyan": (30, 210, 220), "gray": (128, 128, 128),
}

Polygon = np.ndarray  # [K, 2] points in the shape's unit frame (extent about [-1, 1])


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> Polygon:
    t = phase + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.sin(t), -np.cos(t)], axis=1)


def _circle(cx: float = 0.0, cy: float = 0.0, r: float = 1.0) -> Polygon:
    return _regular(48, r) + np.array([cx, cy])


def _star() -> Polygon:
    outer, inner = _regular(5, 1.0), _regular(5, 0.42, math.pi / 5)
    return np.stack([outer, inner], axis=1).reshape(-1, 2)


def _heart() -> Polygon:
    t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], axis=1)
    pts -= (pts.max(0) + pts.min(0)) / 2
    return pts / np.abs(pts).max()


def _poly(*points: tuple[float, float]) -> Polygon:
    return np.asarray(points, dtype=np.float64)


# name -> [(polygon, fill)], drawn in order; fill 0 cuts a hole.
SHAPES: dict[str, list[tuple[Polygon, int]]] = {
    "circle": [(_circle(), 1)],
    "square": [(_regular(4, 1.0, math.pi / 4), 1)],
    "triangle": [(_regular(3, 1.0) + np.array([0.0, 0.2]), 1)],
    "star": [(_star(), 1)],
    "heart": [(_heart(), 1)],
    "ring": [(_circle(), 1), (_circle(r=0.58), 0)],
    "cross": [(_poly((-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
                     (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)), 1)],
    "arrow": [(_poly((-1, -0.22), (0.2, -0.22), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.22), (-1, 0.22)), 1)],
    "hexagon": [(_regular(6, 1.0, math.pi / 6), 1)],
    "diamond": [(_poly((0, -1), (0.62, 0), (0, 1), (-0.62, 0)), 1)],
    "crescent": [(_circle(), 1), (_circle(0.42, -0.22, 0.82), 0)],
    "flower": [(_circle(0.62 * math.sin(a), -0.62 * math.cos(a), 0.4), 1) for a in np.arange(6) * math.pi / 3]
    + [(_circle(r=0.3), 1)],
    "house": [(_poly((-0.75, 1), (-0.75, -0.1), (-1, -0.1), (0, -1), (1, -0.1), (0.75, -0.1), (0.75, 1)), 1)],
    "lightning": [(_poly((-0.1, -1), (0.55, -1), (0.15, -0.15), (0.6, -0.15), (-0.35, 1), (-0.05, 0.1),
                         (-0.55, 0.1)), 1)],
    "hourglass": [(_poly((-0.75, -1), (0.75, -1), (0.08, 0), (0.75, 1), (-0.75, 1), (-0.08, 0)), 1)],
    "pentagon": [(_regular(5, 1.0) + np.array([0.0, 0.1]), 1)],
}


def shape_mask(name: str, *, height: int, width: int, center: tuple[float, float], size: float, angle: float,
               aspect: float = 1.0) -> np.ndarray:
    """bool `[H, W]` mask of shape `name` centred at `center` (x, y px), unit frame scaled to `size / 2` px."""
    cos, sin = math.cos(angle), math.sin(angle)
    rot = np.array([[cos, -sin], [sin, cos]])
    scale = np.array([aspect, 1.0 / aspect]) * size / 2
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon, fill in SHAPES[name]:
        pts = (polygon * scale) @ rot.T + np.asarray(center)
        draw.polygon([tuple(p) for p in pts.tolist()], fill=fill)
    return np.asarray(canvas, dtype=bool)


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A background colour: random, pulled towards its own grey so objects stand out."""
    colour = rng.uniform(30, 225, size=3)
    return colour + rng.uniform(0.3, 0.8) * (colour.mean() - colour)


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """float32 `[H, W, 3]` texture: gradient, blotches, stripes or checks of muted colours, plus grain."""
    a, b = _muted(rng), _muted(rng)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    kind = int(rng.integers(4))
    if kind == 0:  # linear gradient
        t = math.tau * rng.random()
        ramp = (xx * math.cos(t) + yy * math.sin(t))
        w = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    elif kind == 1:  # low-frequency blotches
        grid = rng.random((int(rng.integers(3, 8)), int(rng.integers(3, 8)))).astype(np.float32)
        w = np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)).clip(0, 1)
    elif kind == 2:  # stripes
        t, period = math.tau * rng.random(), rng.uniform(6, 32)
        w = 0.5 + 0.5 * np.sin((xx * math.cos(t) + yy * math.sin(t)) * math.tau / period)
    else:  # checks
        cell = int(rng.integers(8, 40))
        w = ((xx // cell + yy // cell) % 2).astype(np.float32)
    contrast = rng.uniform(0.25, 0.7)  # keeps the texture weaker than the objects
    w = 0.5 + contrast * (w - 0.5)
    image = a * (1 - w[..., None]) + b * w[..., None]
    image += rng.normal(0, rng.uniform(2, 9), size=image.shape)
    return image.astype(np.float32)


@dataclass
class PlacedObject:
    name: str
    colour: str
    mask: np.ndarray  # bool [H, W], visible pixels only (later objects cover earlier ones)

    def box(self) -> list[int]:
        """COCO `[x, y, w, h]` of the visible pixels, integer pixels (the box covers whole pixels)."""
        ys, xs = np.nonzero(self.mask)
        return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _paint(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int]) -> None:
    """Fill `mask` with `colour`, a little shading across the object and some grain."""
    ys, xs = np.nonzero(mask)
    base = np.asarray(colour, dtype=np.float32) + rng.normal(0, 12, size=3)
    t = math.tau * rng.random()
    ramp = xs * math.cos(t) + ys * math.sin(t)
    ramp = (ramp - ramp.mean()) / max(float(np.ptp(ramp)), 1.0)
    shade = 1.0 + rng.uniform(0, 0.35) * ramp[:, None]
    pixels = base[None] * shade + rng.normal(0, 4, size=(len(xs), 3))
    image[ys, xs] = pixels.astype(np.float32)


def _pick_colour(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> str:
    """A palette colour far enough from the background under `mask` to be seen (best of a few draws)."""
    under = image[mask].mean(axis=0) if mask.any() else image.reshape(-1, 3).mean(axis=0)
    names = list(COLOURS)
    best, best_dist = names[0], -1.0
    for _ in range(6):
        name = names[int(rng.integers(len(names)))]
        dist = float(np.linalg.norm(np.asarray(COLOURS[name]) - under))
        if dist >= 90:
            return name
        if dist > best_dist:
            best, best_dist = name, dist
    return best


def place_objects(rng: np.random.Generator, image: np.ndarray, names: list[str], *, size_range: tuple[float, float],
                  min_visible: float = 0.75, margin: int = 1, tries: int = 30) -> list[PlacedObject]:
    """Draw `names` one after another onto `image` (float `[H, W, 3]`, changed in place).

    A placement is kept only when every object already drawn keeps `min_visible` of its pixels, and
    the new object lies `margin` px inside the image; a name that finds no such place is skipped.
    """
    height, width = image.shape[:2]
    placed: list[PlacedObject] = []
    full_area: list[int] = []
    for name in names:
        for _ in range(tries):
            size = rng.uniform(*size_range)
            half = size / 2 + margin
            if 2 * half >= min(height, width):
                continue
            center = (rng.uniform(half, width - half), rng.uniform(half, height - half))
            mask = shape_mask(name, height=height, width=width, center=center, size=size,
                              angle=rng.uniform(0, math.tau), aspect=math.exp(rng.uniform(-0.15, 0.15)))
            if mask.sum() < 16:
                continue
            ok = all(((p.mask & ~mask).sum() >= min_visible * a) for p, a in zip(placed, full_area))
            if not ok:
                continue
            colour = _pick_colour(rng, image, mask)
            _paint(rng, image, mask, COLOURS[colour])
            for p in placed:
                p.mask &= ~mask
            placed.append(PlacedObject(name, colour, mask))
            full_area.append(int(mask.sum()))
            break
    return placed


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_scene(rng: np.random.Generator, *, height: int = 256, width: int = 256,
                 num_objects: tuple[int, int] = (1, 6), size_range: tuple[float, float] = (28, 96),
                 class_names: tuple[str, ...] = CLASS_NAMES) -> tuple[np.ndarray, list[PlacedObject]]:
    """A detection image: uint8 `[H, W, 3]` and its objects (1..6 by default, classes drawn uniformly)."""
    image = background(rng, height, width)
    count = int(rng.integers(num_objects[0], num_objects[1] + 1))
    names = [class_names[int(i)] for i in rng.integers(len(class_names), size=count)]
    objects = place_objects(rng, image, names, size_range=size_range)
    return to_uint8(image), objects


# Caption templates of the image-text set; the first group is a sample of the 80 prompt templates the
# detector's text classifier averages over, so that its prompts are in the language CLIP was trained on.
_PROMPT_STYLE = ("a photo of a {}.", "a bad photo of a {}.", "a cropped photo of the {}.", "a close-up photo of a {}.",
                 "a bright photo of a {}.", "a drawing of a {}.", "a photo of the small {}.", "itap of a {}.",
                 "a low resolution photo of the {}.", "a photo of the large {}.", "a good photo of the {}.",
                 "art of the {}.", "a pixelated photo of the {}.", "a photo of one {}.", "a rendering of a {}.")


def _describe(rng: np.random.Generator, obj: PlacedObject) -> str:
    return f"{obj.colour} {obj.name}" if rng.random() < 0.6 else obj.name


def caption_for(rng: np.random.Generator, objects: list[PlacedObject]) -> str:
    """One caption naming every object of `objects` (in drawing order), with or without colours."""
    words = [_describe(rng, o) for o in objects]
    if len(words) == 1:
        if rng.random() < 0.5:
            return _PROMPT_STYLE[int(rng.integers(len(_PROMPT_STYLE)))].format(words[0])
        return f"a {words[0]}" if rng.random() < 0.7 else words[0]
    listed = ", ".join(f"a {w}" for w in words[:-1]) + f" and a {words[-1]}"
    return listed if rng.random() < 0.5 else f"a photo of {listed}."


def render_crop(rng: np.random.Generator, *, resolution: int, name: str | None = None,
                scene_probability: float = 0.3) -> tuple[np.ndarray, list[PlacedObject]]:
    """An image of the image-text set: uint8 `[R, R, 3]` and the objects its caption names.

    Mostly one object filling 40-95% of the crop, sometimes beside pieces of objects cut by the
    border (as a box cropped out of a scene); otherwise a small scene of 2-3 smaller objects.
    `name` forces a single object of that class (the held-out zero-shot test).
    """
    if name is None and rng.random() < scene_probability:
        image = background(rng, resolution, resolution)
        names = [CLASS_NAMES[int(i)] for i in rng.integers(len(CLASS_NAMES), size=int(rng.integers(2, 4)))]
        objects = place_objects(rng, image, names, size_range=(0.3 * resolution, 0.5 * resolution))
        return to_uint8(image), objects
    name = name or CLASS_NAMES[int(rng.integers(len(CLASS_NAMES)))]
    with_neighbours = rng.random() < 0.35
    # With neighbours: draw on a 2x canvas and cut the middle, so they are cut by the border as in a scene.
    big = 2 * resolution if with_neighbours else resolution
    lo = (big - resolution) // 2
    image = background(rng, big, big)
    if with_neighbours:
        neighbours = [CLASS_NAMES[int(i)] for i in rng.integers(len(CLASS_NAMES), size=int(rng.integers(1, 3)))]
        for other in neighbours:
            # centre in the outer ring of the canvas: at most partly inside the crop
            size = rng.uniform(0.3, 0.6) * resolution
            side = int(rng.integers(4))
            along = rng.uniform(size / 2, big - size / 2)
            across = rng.uniform(size / 2, lo)  # lo = resolution / 2: the centre lies outside the crop
            cx, cy = [(along, across), (along, big - across), (across, along), (big - across, along)][side]
            mask = shape_mask(other, height=big, width=big, center=(cx, cy), size=size, angle=rng.uniform(0, math.tau))
            _paint(rng, image, mask, COLOURS[_pick_colour(rng, image, mask)])
    size = rng.uniform(0.4, 0.95) * resolution
    jitter = (resolution - size) / 2
    center = (big / 2 + rng.uniform(-jitter, jitter), big / 2 + rng.uniform(-jitter, jitter))
    mask = shape_mask(name, height=big, width=big, center=center, size=size, angle=rng.uniform(0, math.tau),
                      aspect=math.exp(rng.uniform(-0.15, 0.15)))
    colour = _pick_colour(rng, image, mask)
    _paint(rng, image, mask, COLOURS[colour])
    crop = slice(lo, lo + resolution)
    return to_uint8(image[crop, crop]), [PlacedObject(name, colour, mask[crop, crop])]


def demo_sheet(path: str, *, seed: int = 0) -> None:
    """A PNG contact sheet: every class once, then a few scenes (to look at the world)."""
    rng = np.random.default_rng(seed)
    tiles = [render_crop(rng, resolution=96, name=n)[0] for n in CLASS_NAMES]
    sheet = Image.new("RGB", (8 * 96, 2 * 96 + 2 * 256))
    for i, tile in enumerate(tiles):
        sheet.paste(Image.fromarray(tile), ((i % 8) * 96, (i // 8) * 96))
    for i in range(6):
        img, objects = render_scene(rng)
        pil = Image.fromarray(img)
        draw = ImageDraw.Draw(pil)
        for o in objects:
            x, y, w, h = o.box()
            draw.rectangle([x, y, x + w - 1, y + h - 1], outline=(255, 255, 255))
            draw.text((x + 2, y + 1), o.name, fill=(255, 255, 255))
        sheet.paste(pil.resize((256, 256)), ((i % 3) * 256, 2 * 96 + (i // 3) * 256))
    sheet.save(path)
