"""Generate a small, deterministic PASCAL VOC-format dataset of drawn shapes.

It writes what the frameworks' real VOC loaders and evaluators read: JPEG images, XML box
annotations, ``SegmentationClass`` PNGs (palette PNGs holding class indices, 255 on object
borders) and ``ImageSets`` split files, as a ``VOCdevkit`` with a ``VOC2007`` folder (detection:
``Main`` splits ``train``/``val``/``trainval``/``test``) and a ``VOC2012`` folder (segmentation:
``Segmentation`` splits ``train``/``val``/``trainval``; also ``Main`` splits).

Every object belongs to one of :data:`TOY_CLASSES` (a subset of the 20 VOC classes, so the
standard 20-class heads and evaluators are used unchanged); each class has its own shape and
colour so a model can learn it quickly.

Usage::

    python -m lrpet_dense.data.toy_voc OUT_DIR [--train 48] [--test 16] [--size 160] \\
        [--max-objects 3] [--object-size 0.2 0.5] [--noise 12]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
from typing import Dict, List, Optional, Sequence, Tuple
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["VOC_CLASSES", "TOY_CLASSES", "make_toy_voc", "write_voc", "generated_dataset", "MARKER"]

logger = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
# class -> (shape, RGB colour)
_STYLE: Dict[str, Tuple[str, Tuple[int, int, int]]] = {
    "car": ("rectangle", (220, 40, 40)),
    "cat": ("ellipse", (40, 200, 60)),
    "dog": ("triangle", (40, 80, 230)),
}
TOY_CLASSES = tuple(_STYLE)
#: The file :func:`write_voc` leaves in the ``VOCdevkit`` it writes, naming how it was generated.
MARKER = "lrpet_dataset.json"


def _palette() -> List[int]:
    # The standard VOC colour map (bit-interleaved), so the PNGs look like real VOC masks.
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def _draw_scene(rng: random.Random, size: int, max_objects: int = 3, object_size: Tuple[float, float] = (0.2, 0.5),
                noise: float = 12.0):
    img = Image.new("RGB", (size, size))
    # textured background: smooth gradient plus noise, so the task is not trivial
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([(xx * rng.uniform(0.2, 0.6)) % 120 + 60, (yy * rng.uniform(0.2, 0.6)) % 120 + 60,
                     np.full_like(xx, rng.randint(60, 180))], -1).astype(np.float32)
    pixel_noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, noise, base.shape)
    img = Image.fromarray(np.clip(base + pixel_noise, 0, 255).astype(np.uint8))
    mask = Image.new("L", (size, size), 0)
    d_img, d_mask = ImageDraw.Draw(img), ImageDraw.Draw(mask)
    objects = []
    # exact floors (1e-9 guards float round-off), so the defaults give size // 5 and size // 2
    lo, hi = (int(math.floor(size * f + 1e-9)) for f in object_size)
    for _ in range(rng.randint(1, max_objects)):
        cls = rng.choice(TOY_CLASSES)
        shape, colour = _STYLE[cls]
        w, h = rng.randint(lo, hi), rng.randint(lo, hi)
        x0, y0 = rng.randint(0, size - w - 1), rng.randint(0, size - h - 1)
        box = (x0, y0, x0 + w, y0 + h)
        colour = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in colour)
        label = VOC_CLASSES.index(cls) + 1
        if shape == "rectangle":
            d_img.rectangle(box, fill=colour)
            d_mask.rectangle(box, fill=label, outline=255, width=2)
        elif shape == "ellipse":
            d_img.ellipse(box, fill=colour)
            d_mask.ellipse(box, fill=label, outline=255, width=2)
        else:
            tri = [(x0, y0 + h), (x0 + w, y0 + h), (x0 + w // 2, y0)]
            d_img.polygon(tri, fill=colour)
            d_mask.polygon(tri, fill=label, outline=255)
        objects.append((cls, box))
    return img, mask, objects


def _xml(image_id: str, size: int, objects: Sequence[tuple], folder: str) -> str:
    """VOC XML of ``objects``: ``(class, (x0, y0, x1, y1))`` or ``(class, box, difficult)``."""
    objs = "".join(
        f"<object><name>{escape(o[0])}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{int(o[2]) if len(o) > 2 else 0}</difficult><bndbox><xmin>{o[1][0] + 1}</xmin>"
        f"<ymin>{o[1][1] + 1}</ymin><xmax>{o[1][2] + 1}</xmax><ymax>{o[1][3] + 1}</ymax></bndbox></object>"
        for o in objects)
    return (f"<annotation><folder>{folder}</folder><filename>{image_id}.jpg</filename>"
            f"<size><width>{size}</width><height>{size}</height><depth>3</depth></size>"
            f"<segmented>1</segmented>{objs}</annotation>\n")


def make_toy_voc(root: str, num_train: int = 48, num_test: int = 16, size: int = 160, seed: int = 0, *,
                 max_objects: int = 3, object_size: Tuple[float, float] = (0.2, 0.5), noise: float = 12.0) -> str:
    """Write ``root/VOCdevkit/VOC2007`` and ``root/VOCdevkit/VOC2012`` and return ``root/VOCdevkit``.

    Deterministic for given arguments. Existing files are overwritten.

    Args:
        root: output folder (created).
        num_train: images in the ``train``/``trainval`` splits. Defaults to 48.
        num_test: images in ``test`` (VOC2007) / ``val`` (VOC2012). Defaults to 16.
        size: square image side in pixels. Defaults to 160.
        seed: random seed. Defaults to 0.
        max_objects: each image holds 1 to ``max_objects`` objects (>= 1). Defaults to 3.
        object_size: ``(min, max)`` box side as a fraction of ``size``, ``0 < min <= max < 1``.
            Defaults to ``(0.2, 0.5)``.
        noise: standard deviation of the background's Gaussian pixel noise (>= 0). Defaults to 12.

    Example:
        >>> devkit = make_toy_voc("/tmp/toy", num_train=8, num_test=4, size=96)  # doctest: +SKIP
    """
    if num_train < 1 or num_test < 1 or size < 32:
        raise ValueError(f"need num_train >= 1, num_test >= 1, size >= 32; got {num_train}, {num_test}, {size}")
    if isinstance(max_objects, bool) or not isinstance(max_objects, int) or max_objects < 1:
        raise ValueError(f"max_objects must be an integer >= 1, got {max_objects!r}")
    object_size = tuple(float(f) for f in object_size)
    if len(object_size) != 2 or not 0 < object_size[0] <= object_size[1] < 1 or int(size * object_size[0]) < 2:
        raise ValueError(f"object_size must be (min, max) fractions with 0 < min <= max < 1 and min * size >= 2, "
                         f"got {object_size!r} for size {size}")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    return write_voc(root, lambda rng: _draw_scene(rng, size, max_objects, object_size, noise), num_train, num_test,
                     size, seed, "toy")


def write_voc(root: str, draw, num_train: int, num_test: int, size: int, seed: int, what: str = "toy") -> str:
    """Write a ``VOCdevkit`` (``VOC2007`` detection splits, ``VOC2012`` segmentation splits) of scenes
    from ``draw(rng) -> (RGB image, label mask, [(class, box, difficult?)...])``; return its path.

    Masks hold VOC class indices (255 = ignored border) as palette PNGs; boxes go to the XML files.
    """
    devkit = os.path.join(root, "VOCdevkit")
    pal = _palette()
    for year in ("2007", "2012"):
        rng = random.Random(f"{seed}-{year}")
        base = os.path.join(devkit, f"VOC{year}")
        for sub in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Main", "ImageSets/Segmentation"):
            os.makedirs(os.path.join(base, sub), exist_ok=True)
        ids = [f"{year}_{i:06d}" for i in range(num_train + num_test)]
        for image_id in ids:
            img, mask, objects = draw(rng)
            img.save(os.path.join(base, "JPEGImages", image_id + ".jpg"), quality=95)
            mask.putpalette(pal)
            mask.save(os.path.join(base, "SegmentationClass", image_id + ".png"))
            with open(os.path.join(base, "Annotations", image_id + ".xml"), "w") as f:
                f.write(_xml(image_id, size, objects, f"VOC{year}"))
        train, test = ids[:num_train], ids[num_train:]
        splits = {"train": train, "trainval": train, "val": test, "test": test}
        for split, split_ids in splits.items():
            for sub in ("Main", "Segmentation"):
                with open(os.path.join(base, "ImageSets", sub, split + ".txt"), "w") as f:
                    f.write("\n".join(split_ids) + "\n")
    with open(os.path.join(devkit, MARKER), "w") as f:
        json.dump({"generated_by": "lrpet_dense", "kind": what, "train": num_train, "test": num_test, "size": size,
                   "seed": seed}, f)
    logger.info("wrote a %s VOC dataset (%d train, %d test images of %dpx) to %s", what, num_train, num_test, size,
                devkit)
    return devkit


def generated_dataset(path: Optional[str]) -> Optional[Dict[str, object]]:
    """What :func:`write_voc` wrote about the dataset at ``path``, or None for any other dataset.

    Args:
        path: a ``VOCdevkit`` folder or one of its ``VOC2007`` / ``VOC2012`` folders (a detectron2
            dataset's ``dirname``, an mmseg dataset's ``data_root``); None gives None.

    Returns:
        ``{"generated_by", "kind" ("toy" | "proxy"), "train", "test", "size", "seed"}`` or None.
    """
    if not path:
        return None
    path = os.path.abspath(str(path))
    for folder in (path, os.path.dirname(path)):
        marker = os.path.join(folder, MARKER)
        if os.path.isfile(marker):
            with open(marker) as f:
                data = json.load(f)
            if not isinstance(data, dict) or data.get("generated_by") != "lrpet_dense":
                raise ValueError(f"{marker!r} is not a dataset marker written by lrpet_dense.data: {data!r}")
            return data
    return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root")
    parser.add_argument("--train", type=int, default=48)
    parser.add_argument("--test", type=int, default=16)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-objects", type=int, default=3, help="1 to this many objects per image")
    parser.add_argument("--object-size", type=float, nargs=2, default=(0.2, 0.5), metavar=("MIN", "MAX"),
                        help="box side range as a fraction of the image side")
    parser.add_argument("--noise", type=float, default=12.0, help="std of the background pixel noise")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    make_toy_voc(args.root, args.train, args.test, args.size, args.seed, max_objects=args.max_objects,
                 object_size=tuple(args.object_size), noise=args.noise)


if __name__ == "__main__":
    main()
