"""A harder generated VOC-format dataset: the fidelity benchmark's proxy task.

The toy set (:mod:`lrpet_dense.data.toy_voc`) is made to be learned in minutes: three classes with
their own colours. Here a model has to combine cues, so that compressing it without training
visibly costs accuracy:

- eight classes (a subset of VOC's 20), each a **shape and texture** pair: every shape is shared by
  two classes and every texture by two or three, so neither identifies a class alone; colours are
  drawn independently of the class (uninformative);
- 2 to 6 objects per image, some **small** (down to 8% of the side), placed freely so that they
  overlap and occlude each other (a box whose object is mostly hidden is marked ``difficult``, which
  VOC's evaluator ignores; the mask shows what is visible);
- **distractors**: shapes with other textures (rings, crosses, noise-filled blobs) that belong to no
  class (background in the masks, no box);
- **varied backgrounds**: smooth gradients, low-frequency colour blobs or faint large-scale stripes,
  with pixel noise; JPEG compression.

The files are what the frameworks' VOC loaders and evaluators read (see ``toy_voc``). Usage::

    python -m lrpet_dense.data.proxy_voc OUT_DIR [--train 160] [--test 40] [--size 96] [--seed 0] [--classes 8]
"""
from __future__ import annotations

import argparse
import logging
import math
import random
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .toy_voc import VOC_CLASSES, write_voc

__all__ = ["PROXY_CLASSES", "make_proxy_voc"]

logger = logging.getLogger(__name__)

#: class -> (shape, texture). Shapes and textures are shared between classes.
_STYLE: Dict[str, Tuple[str, str]] = {
    "aeroplane": ("triangle", "stripes_h"),
    "bird": ("triangle", "checker"),
    "boat": ("rectangle", "stripes_v"),
    "car": ("rectangle", "solid"),
    "cat": ("ellipse", "dots"),
    "dog": ("ellipse", "stripes_h"),
    "person": ("diamond", "solid"),
    "sheep": ("diamond", "checker"),
}
PROXY_CLASSES = tuple(_STYLE)
#: Which classes a smaller proxy keeps (``num_classes`` < 8): the first ones of this order, chosen so that
#: shapes stay shared between classes (triangles, ellipses) and so do textures (horizontal stripes).
_SUBSET_ORDER = ("aeroplane", "bird", "dog", "cat", "boat", "car", "person", "sheep")
_HUES = [(200, 60, 50), (60, 170, 70), (50, 90, 210), (210, 190, 50), (170, 70, 190), (60, 180, 190)]


def _texture(kind: str, w: int, h: int, colour, rng: random.Random) -> np.ndarray:
    """An ``h x w x 3`` texture: ``colour`` and a darker / lighter second tone in a pattern."""
    c1 = np.array(colour, dtype=np.float32)
    c2 = np.clip(c1 * rng.uniform(0.35, 0.6) + rng.uniform(-20, 20), 0, 255) if rng.random() < 0.5 else \
        np.clip(c1 + rng.uniform(60, 110), 0, 255)
    yy, xx = np.mgrid[0:h, 0:w]
    period = rng.randint(3, 5)
    if kind == "solid":
        sel = np.zeros((h, w), bool)
    elif kind == "stripes_h":
        sel = (yy // period) % 2 == 0
    elif kind == "stripes_v":
        sel = (xx // period) % 2 == 0
    elif kind == "checker":
        sel = ((yy // period) + (xx // period)) % 2 == 0
    elif kind == "dots":
        sel = ((yy % (period + 2)) < 2) & ((xx % (period + 2)) < 2)
    elif kind == "diagonal":  # distractors only
        sel = ((xx + yy) // period) % 2 == 0
    else:  # "noise", distractors only
        sel = np.random.default_rng(rng.randint(0, 2 ** 31)).random((h, w)) < 0.5
    return np.where(sel[..., None], c2, c1)


def _polygon(shape: str, box: Tuple[int, int, int, int]) -> List[Tuple[float, float]]:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "triangle":
        return [(x0, y1), (x1, y1), (cx, y0)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "cross":
        tx, ty = (x1 - x0) / 6, (y1 - y0) / 6
        return [(cx - tx, y0), (cx + tx, y0), (cx + tx, cy - ty), (x1, cy - ty), (x1, cy + ty), (cx + tx, cy + ty),
                (cx + tx, y1), (cx - tx, y1), (cx - tx, cy + ty), (x0, cy + ty), (x0, cy - ty), (cx - tx, cy - ty)]
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _shape_mask(shape: str, box: Tuple[int, int, int, int], size: int) -> np.ndarray:
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    if shape == "ellipse":
        d.ellipse(box, fill=1)
    elif shape == "ring":
        d.ellipse(box, fill=1)
        x0, y0, x1, y1 = box
        ix, iy = (x1 - x0) // 4, (y1 - y0) // 4
        d.ellipse((x0 + ix, y0 + iy, x1 - ix, y1 - iy), fill=0)
    else:
        d.polygon(_polygon(shape, box), fill=1)
    return np.array(m, dtype=bool)


def _background(rng: random.Random, size: int, noise: float) -> np.ndarray:
    nrng = np.random.default_rng(rng.randint(0, 2 ** 31))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = rng.choice(("gradient", "blobs", "stripes"))
    if kind == "gradient":
        a, b = nrng.uniform(40, 200, 3), nrng.uniform(40, 200, 3)
        t = (xx * math.cos(rng.uniform(0, 6.3)) + yy * math.sin(rng.uniform(0, 6.3))) / size
        bg = a + (b - a) * ((t - t.min()) / (np.ptp(t) + 1e-6))[..., None]
    elif kind == "blobs":
        coarse = nrng.uniform(40, 210, (4, 4, 3)).astype(np.uint8)
        bg = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32)
    else:
        base = nrng.uniform(60, 190, 3)
        period = rng.randint(12, 24)
        bg = base + 18 * np.sign(np.sin(2 * math.pi * (xx + yy * rng.uniform(-1, 1)) / period))[..., None]
    return bg + nrng.normal(0, noise, (size, size, 3))


def _draw_scene(rng: random.Random, size: int, noise: float = 10.0, max_objects: int = 6,
                object_size: Tuple[float, float] = (0.08, 0.4), distractors: Tuple[int, int] = (1, 3),
                classes: Tuple[str, ...] = PROXY_CLASSES):
    img = _background(rng, size, noise)
    label = np.zeros((size, size), np.uint8)
    lo, hi = (max(4, int(math.floor(size * f + 1e-9))) for f in object_size)
    placed = []  # (class, box, full mask) in drawing order
    items = [("distractor", None) for _ in range(rng.randint(*distractors))]
    items += [("object", rng.choice(classes)) for _ in range(rng.randint(2, max_objects))]
    rng.shuffle(items)
    for kind, cls in items:
        w, h = rng.randint(lo, hi), rng.randint(lo, hi)
        x0, y0 = rng.randint(0, size - w - 1), rng.randint(0, size - h - 1)
        box = (x0, y0, x0 + w, y0 + h)
        if kind == "distractor":
            shape, tex, value = rng.choice(("ring", "cross", "ellipse")), rng.choice(("diagonal", "noise")), 0
        else:
            (shape, tex), value = _STYLE[cls], VOC_CLASSES.index(cls) + 1
        colour = tuple(min(255, max(0, c + rng.randint(-30, 30))) for c in rng.choice(_HUES))
        m = _shape_mask(shape, box, size)
        patch = _texture(tex, w + 1, h + 1, colour, rng)
        region = img[y0:y0 + h + 1, x0:x0 + w + 1]
        sel = m[y0:y0 + h + 1, x0:x0 + w + 1]
        region[sel] = patch[sel]
        label[m] = value
        if kind == "object":
            placed.append((cls, box, m, value))
    # the border of every visible object is ignored (255), as in VOC masks
    ignore = np.zeros_like(label, dtype=bool)
    objects = []
    for cls, box, m, value in placed:
        visible = m & (label == value)
        edge = visible & ~np.asarray(Image.fromarray(visible.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(3)),
                                     dtype=bool)
        ignore |= edge
        objects.append((cls, box, visible.sum() < 0.4 * m.sum()))  # mostly hidden: "difficult"
    label[ignore] = 255
    image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return image, Image.fromarray(label, mode="P"), objects


def make_proxy_voc(root: str, num_train: int = 160, num_test: int = 40, size: int = 96, seed: int = 0, *,
                   noise: float = 10.0, num_classes: int = 8, classes: Optional[Sequence[str]] = None) -> str:
    """Write the proxy dataset as ``root/VOCdevkit`` (``VOC2007`` detection, ``VOC2012`` segmentation); return it.

    Deterministic for given arguments.

    Args:
        root: output folder (created).
        num_train: images in ``train``/``trainval``. Defaults to 160.
        num_test: images in ``test`` (VOC2007) / ``val`` (VOC2012). Defaults to 40.
        size: square image side (>= 64). Defaults to 96.
        seed: random seed. Defaults to 0.
        noise: standard deviation of the background's pixel noise. Defaults to 10.
        num_classes: how many of the eight classes appear (2 to 8; fewer make an easier, faster-learned task).
            Defaults to 8.
        classes: which of :data:`PROXY_CLASSES` appear, by name (instead of ``num_classes``; e.g. disjoint
            sets for a source task to pretrain on and a target task). Defaults to None.
    """
    if num_train < 1 or num_test < 1 or size < 64:
        raise ValueError(f"need num_train >= 1, num_test >= 1, size >= 64; got {num_train}, {num_test}, {size}")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 2 <= num_classes <= len(PROXY_CLASSES):
        raise ValueError(f"num_classes must be an integer in [2, {len(PROXY_CLASSES)}], got {num_classes!r}")
    if classes is not None:
        unknown = [c for c in classes if c not in PROXY_CLASSES]
        if unknown or len(set(classes)) < 1 or len(set(classes)) != len(tuple(classes)):
            raise ValueError(f"classes must be distinct names from {PROXY_CLASSES}, got {classes!r}")
        classes = tuple(classes)
    else:
        classes = PROXY_CLASSES if num_classes == len(PROXY_CLASSES) else _SUBSET_ORDER[:num_classes]
    return write_voc(root, lambda rng: _draw_scene(rng, size, noise, classes=classes), num_train, num_test, size, seed,
                     "proxy")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root")
    parser.add_argument("--train", type=int, default=160)
    parser.add_argument("--test", type=int, default=40)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", type=float, default=10.0)
    parser.add_argument("--classes", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    make_proxy_voc(args.root, args.train, args.test, args.size, args.seed, noise=args.noise, num_classes=args.classes)


if __name__ == "__main__":
    main()
