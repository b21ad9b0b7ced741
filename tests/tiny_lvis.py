"""Test helper: a tiny LVIS-v1-format dataset over the image files of tests/tiny_coco.py (no tests here).

Layout under `root` (what `--lvis_path` expects):

    train2017/, val2017/                         tiny_coco's images (LVIS reads them by `coco_url`)
    lvis_v1_train_norare.json                    the train images, boxes of the common and frequent classes only
                                                 (categories: those 4), as LVIS's open-vocabulary setting has it
    lvis_v1_train_norare_RN50relabel.json        the same content (the R50 config's --label_version RN50base)
    lvis_v1_val.json                             the val images, every box, all 6 categories

Six categories with LVIS's fields (`frequency` r / c / f, `synonyms`, names with `_` and a parenthesised
qualifier): two rare ones never boxed in training. Every image lists `neg_category_ids` (classes verified
absent) and `not_exhaustive_category_ids` (one val image marks a present class as not exhaustively
annotated), so the federated evaluation has something to do.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.tiny_coco import make_tiny_coco

CATEGORIES: tuple[dict[str, Any], ...] = (
    {"id": 3, "name": "aerosol_can", "frequency": "f", "synonyms": ["aerosol_can", "spray_can"]},
    {"id": 11, "name": "ball_(toy)", "frequency": "r", "synonyms": ["ball_(toy)", "toy_ball"]},
    {"id": 1, "name": "apple", "frequency": "f", "synonyms": ["apple"]},
    {"id": 7, "name": "bow_(weapon)", "frequency": "c", "synonyms": ["bow_(weapon)", "longbow"]},
    {"id": 20, "name": "cider", "frequency": "r", "synonyms": ["cider", "cyder"]},
    {"id": 9, "name": "traffic_light", "frequency": "c", "synonyms": ["traffic_light"]},
)  # listed out of id order, as a json may
RARE_IDS = tuple(c["id"] for c in CATEGORIES if c["frequency"] == "r")
TRAIN_JSON, VAL_JSON = "lvis_v1_train_norare.json", "lvis_v1_val.json"
RELABEL_JSON = "lvis_v1_train_norare_RN50relabel.json"


def _lvis_category(coco_category_id: int, split: str) -> int:
    """A deterministic LVIS category for a tiny-COCO box; training never gets a rare one."""
    pool = [c["id"] for c in CATEGORIES if split == "val" or c["frequency"] != "r"]
    return pool[coco_category_id % len(pool)]


def _split(tiny: dict, split: str) -> tuple[list[dict], list[dict]]:
    gt = tiny["gt"][split]
    annotations = []
    for a in gt["annotations"]:
        if a["iscrowd"]:
            continue  # LVIS has no crowd boxes
        annotations.append({k: a[k] for k in ("id", "image_id", "bbox", "area")}
                           | {"category_id": _lvis_category(a["category_id"], split)})
    present: dict[int, set[int]] = {}
    for a in annotations:
        present.setdefault(a["image_id"], set()).add(a["category_id"])
    images = []
    all_ids = sorted(c["id"] for c in CATEGORIES)
    for k, img in enumerate(sorted(gt["images"], key=lambda i: i["id"])):
        here = present.get(img["id"], set())
        absent = [c for c in all_ids if c not in here]
        images.append({k2: img[k2] for k2 in ("id", "height", "width", "coco_url")}
                      | {"neg_category_ids": absent[: 1 + k % 3],
                         "not_exhaustive_category_ids": sorted(here)[:1] if split == "val" and k == 1 else []})
    return images, annotations


def make_tiny_lvis(root: str | Path, seed: int = 0) -> dict[str, Any]:
    """Write the dataset under `root`; returns `{"root", "train", "val"}` (the json contents written)."""
    root = Path(root)
    tiny = make_tiny_coco(root, seed=seed)
    train_images, train_anns = _split(tiny, "train")
    val_images, val_anns = _split(tiny, "val")
    if not any(a["category_id"] in RARE_IDS for a in val_anns):
        raise AssertionError("tiny LVIS: the val set holds no rare-class box (seed?)")
    train = {"images": train_images, "annotations": train_anns,
             "categories": [c for c in CATEGORIES if c["frequency"] != "r"]}
    val = {"images": val_images, "annotations": val_anns, "categories": list(CATEGORIES)}
    for name, data in ((TRAIN_JSON, train), (RELABEL_JSON, train), (VAL_JSON, val)):
        (root / name).write_text(json.dumps(data))
    return {"root": root, "train": train, "val": val}
