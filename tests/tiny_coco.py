"""Test helper: writes a tiny COCO-OVD dataset of real image files (no tests in this module).

Layout written under `root` (the layout `--coco_path` expects):

    train2017/<12-digit id>.jpg      6 images: RGB ×4, one grayscale ('L'), one CMYK
    val2017/<12-digit id>.png        4 images: RGB, RGBA (varying alpha), grayscale ('L'), palette ('P')
    annotations/instances_train2017_base.json            the 48 base categories
    annotations/instances_train2017_base_RN50relabel.json same content
    annotations/instances_val2017_basetarget.json        all 65 OVD categories

Images are 64–160 px, coloured rectangles and ellipses on a plain background; each non-crowd
annotation's bbox `[x, y, w, h]` (integers, absolute pixels) is exactly the drawn shape's pixel
extent. Image ids are listed in the json out of order. Fixed structure (the geometry, colours and
categories depend on `seed`): train image 139 and val image 397133 have one crowd box each
(`iscrowd` 1, over the right or bottom half of the image); train image 724 and val image 87038
have no annotation; val images contain at least one novel-category box each (the others use base
categories only).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from datasets.coco_ovd import BASE_CATIDS as BASE_CATEGORY_IDS
from datasets.coco_ovd import COCO_OVD_TABLE as COCO_OVD_CATEGORIES
from datasets.coco_ovd import NOVEL_CATIDS as NOVEL_CATEGORY_IDS

# (image id, PIL mode written, number of drawn objects, has a crowd box); json order, not id order.
TRAIN_IMAGES: tuple[tuple[int, str, int, bool], ...] = (
    (785, "RGB", 2, False),
    (139, "RGB", 3, True),
    (632, "L", 2, False),
    (285, "RGB", 1, False),
    (776, "CMYK", 3, False),
    (724, "RGB", 0, False),
)
VAL_IMAGES: tuple[tuple[int, str, int, bool], ...] = (
    (397133, "RGB", 3, True),
    (37777, "RGBA", 2, False),
    (252219, "L", 2, False),
    (87038, "P", 0, False),
)

TRAIN_JSON = "instances_train2017_base.json"
TRAIN_RELABEL_JSON = "instances_train2017_base_RN50relabel.json"
VAL_JSON = "instances_val2017_basetarget.json"


def _categories(ids: tuple[int, ...]) -> list[dict[str, Any]]:
    return [{"supercategory": "", "id": c, "name": n} for c, n, _ in COCO_OVD_CATEGORIES if c in ids]


def _draw_image(
    rng: random.Random, width: int, height: int, n_objects: int, category_pool: list[int], need_novel: bool
) -> tuple[Image.Image, list[tuple[list[int], int]]]:
    """An RGB canvas with `n_objects` filled shapes; returns it and `[(bbox xywh, category id)]`."""
    background = tuple(rng.randrange(0, 80) for _ in range(3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    objects = []
    for k in range(n_objects):
        box_w = rng.randint(12, width // 2)
        box_h = rng.randint(12, height // 2)
        x0 = rng.randint(0, width - box_w)
        y0 = rng.randint(0, height - box_h)
        x1, y1 = x0 + box_w - 1, y0 + box_h - 1  # PIL fills both end pixels
        colour = tuple(rng.randrange(120, 256) for _ in range(3))
        if rng.random() < 0.5:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        pool = list(NOVEL_CATEGORY_IDS) if (need_novel and k == 0) else category_pool
        objects.append(([x0, y0, box_w, box_h], rng.choice(pool)))
    return image, objects


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    if mode == "RGBA":
        rgba = image.convert("RGBA")
        width, height = image.size
        alpha = np.tile((np.arange(width) * 255 // max(width - 1, 1)).astype(np.uint8), (height, 1))
        rgba.putalpha(Image.fromarray(alpha, mode="L"))
        return rgba
    if mode == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    return image.convert(mode)


def _crowd_annotation(
    rng: random.Random, ann_id: int, image_id: int, width: int, height: int, category_id: int
) -> dict[str, Any]:
    """A crowd region (the right or bottom half of the image) with its RLE mask."""
    x, y, w, h = (
        (width // 2, 0, width - width // 2, height)
        if rng.random() < 0.5
        else (0, height // 2, width, height - height // 2)
    )
    mask = np.zeros((height, width), dtype=np.uint8, order="F")
    mask[y : y + h, x : x + w] = 1
    rle = mask_utils.encode(mask)
    rle["counts"] = rle["counts"].decode("ascii")
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": [x, y, w, h],
        "area": float(w * h),
        "iscrowd": 1,
        "segmentation": rle,
    }


def _write_split(
    rng: random.Random,
    root: Path,
    split: str,
    images_spec: tuple[tuple[int, str, int, bool], ...],
    category_pool: list[int],
    need_novel: bool,
    first_ann_id: int,
    extension: str,
    modes: dict[int, str],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    folder = root / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = first_ann_id
    for image_id, mode, n_objects, has_crowd in images_spec:
        width, height = rng.randint(64, 160), rng.randint(64, 160)
        canvas, objects = _draw_image(
            rng, width, height, n_objects, category_pool, need_novel and n_objects > 0
        )
        file_name = f"{image_id:012d}.{extension}"
        out = _to_mode(canvas, mode)
        if extension == "jpg":
            out.save(folder / file_name, quality=95)
        else:
            out.save(folder / file_name)
        modes[image_id] = mode
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "height": height,
                "width": width,
                "coco_url": f"http://images.cocodataset.org/{split}2017/{file_name}",
            }
        )
        for (x, y, w, h), category_id in objects:
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": [x, y, w, h],
                    "area": float(w * h),
                    "iscrowd": 0,
                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                }
            )
            ann_id += 1
        if has_crowd:
            annotations.append(
                _crowd_annotation(rng, ann_id, image_id, width, height, rng.choice(category_pool))
            )
            ann_id += 1
    return images, annotations


def make_tiny_coco(root: str | Path, seed: int = 0) -> dict[str, Any]:
    """Write the dataset under `root` (created if needed); same `seed` → identical files.

    Returns `{"root", "image_dirs": {"train", "val"}, "ann_files": {"train_base", "train_RN50relabel",
    "val_basetarget"}, "gt": {"train", "val"}` (the json contents written), `"modes": {image id: PIL
    mode of the file}}`; paths are `pathlib.Path`.
    """
    root = Path(root)
    rng = random.Random(seed)
    modes: dict[int, str] = {}
    train_images, train_anns = _write_split(
        rng, root, "train", TRAIN_IMAGES, list(BASE_CATEGORY_IDS), False, 1, "jpg", modes
    )
    val_images, val_anns = _write_split(
        rng, root, "val", VAL_IMAGES, [c for c, _, _ in COCO_OVD_CATEGORIES], True, 1001, "png", modes
    )
    info = {"description": f"tiny COCO-OVD test data, seed {seed}"}
    train = {
        "info": info,
        "licenses": [],
        "images": train_images,
        "annotations": train_anns,
        "categories": _categories(BASE_CATEGORY_IDS),
    }
    val = {
        "info": info,
        "licenses": [],
        "images": val_images,
        "annotations": val_anns,
        "categories": _categories(tuple(c for c, _, _ in COCO_OVD_CATEGORIES)),
    }
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    ann_files = {
        "train_base": ann_dir / TRAIN_JSON,
        "train_RN50relabel": ann_dir / TRAIN_RELABEL_JSON,
        "val_basetarget": ann_dir / VAL_JSON,
    }
    for key, data in (("train_base", train), ("train_RN50relabel", train), ("val_basetarget", val)):
        with open(ann_files[key], "w") as f:
            json.dump(data, f)
    return {
        "root": root,
        "image_dirs": {"train": root / "train2017", "val": root / "val2017"},
        "ann_files": ann_files,
        "gt": {"train": train, "val": val},
        "modes": modes,
    }
