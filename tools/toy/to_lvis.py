"""The toy world in LVIS v1's format, for configs/LVIS/ in miniature.

    python -m tools.toy.to_lvis --data data/toy --out data/toy_lvis

Writes what `--lvis_path` expects: `lvis_v1_train_norare.json` (the training scenes' base boxes, base
categories only: LVIS's open-vocabulary setting), `lvis_v1_val.json` (the val scenes, every box, all 16
categories) and `train2017/`, `val2017/` (links to the world's images, read by each image's `coco_url`).
Categories carry LVIS's fields: `frequency` from the number of training images holding a box of the
class (LVIS's rule is r: 1-10, c: 11-100, f: more, of 100k images; the toy's 2000 scenes hold every base
class hundreds of times, so the base classes are split at the median count: the less frequent half
`c`, the rest `f`; the novel classes, never boxed in training, are `r`), `synonyms`, `image_count`,
`instance_count`. Every box of the toy world is annotated, so each val image lists every class it does
not hold as a verified negative (`neg_category_ids`) and none as not exhaustive.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from datasets.lvis import LVIS_TRAIN_JSON, LVIS_VAL_JSON  # noqa: E402
from tools.toy.make_dataset import TRAIN_BASE_JSON, VAL_JSON  # noqa: E402
from util.atomic import write_json  # noqa: E402


def frequencies(train: dict[str, Any], val: dict[str, Any]) -> dict[int, str]:
    """category id -> 'r' / 'c' / 'f' from the training-image counts (module doc)."""
    images_with: dict[int, set[int]] = {c["id"]: set() for c in val["categories"]}
    for a in train["annotations"]:
        images_with[a["category_id"]].add(a["image_id"])
    counts = {c: len(ids) for c, ids in images_with.items()}
    boxed = sorted((n, c) for c, n in counts.items() if n > 0)
    common = {c for _, c in boxed[: len(boxed) // 2]}
    return {c: "r" if counts[c] == 0 else "c" if c in common else "f" for c in counts}


def _image(img: dict[str, Any], split: str) -> dict[str, Any]:
    return {"id": img["id"], "width": img["width"], "height": img["height"],
            "coco_url": f"http://images.cocodataset.org/{split}/{img['file_name']}"}


def _categories(categories: list[dict], frequency: dict[int, str], annotations: list[dict]) -> list[dict]:
    images: dict[int, set[int]] = {c["id"]: set() for c in categories}
    instances = dict.fromkeys(images, 0)
    for a in annotations:
        images[a["category_id"]].add(a["image_id"])
        instances[a["category_id"]] += 1
    return [{"id": c["id"], "name": c["name"], "synonyms": [c["name"]], "frequency": frequency[c["id"]],
             "image_count": len(images[c["id"]]), "instance_count": instances[c["id"]]} for c in categories]


def _annotation(a: dict[str, Any]) -> dict[str, Any]:
    return {"id": a["id"], "image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
            "area": a["bbox"][2] * a["bbox"][3]}


def to_lvis(data: Path, out: Path) -> dict[str, dict[str, Any]]:
    train = json.loads((data / "annotations" / TRAIN_BASE_JSON).read_text())
    val = json.loads((data / "annotations" / VAL_JSON).read_text())
    frequency = frequencies(train, val)
    train_anns = [_annotation(a) for a in train["annotations"] if not a.get("iscrowd", 0)]
    val_anns = [_annotation(a) for a in val["annotations"] if not a.get("iscrowd", 0)]
    present: dict[int, set[int]] = {}
    for a in val_anns:
        present.setdefault(a["image_id"], set()).add(a["category_id"])
    all_ids = sorted(c["id"] for c in val["categories"])
    val_images = [{**_image(img, "val2017"), "not_exhaustive_category_ids": [],
                   "neg_category_ids": [c for c in all_ids if c not in present.get(img["id"], set())]}
                  for img in val["images"]]
    train_images = [{**_image(img, "train2017"), "not_exhaustive_category_ids": [], "neg_category_ids": []}
                    for img in train["images"]]
    base = [c for c in val["categories"] if frequency[c["id"]] != "r"]
    lvis_train = {"images": train_images, "annotations": train_anns,
                  "categories": _categories(base, frequency, train_anns)}
    lvis_val = {"images": val_images, "annotations": val_anns,
                "categories": _categories(val["categories"], frequency, val_anns)}
    out.mkdir(parents=True, exist_ok=True)
    write_json(lvis_train, out / LVIS_TRAIN_JSON)
    write_json(lvis_val, out / LVIS_VAL_JSON)
    for split in ("train2017", "val2017"):
        link = out / split
        if not link.exists():
            link.symlink_to(os.path.relpath((data / split).resolve(), out.resolve()))
    return {"train": lvis_train, "val": lvis_val}


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/toy", help="the toy world (tools/toy/make_dataset.py's --out)")
    p.add_argument("--out", default="data/toy_lvis", help="the LVIS-format copy (--lvis_path)")
    args = p.parse_args(argv)
    result = to_lvis(Path(args.data), Path(args.out))
    groups = {f: [c["name"] for c in result["val"]["categories"] if c["frequency"] == f] for f in "rcf"}
    print(f"-> {args.out}: rare {groups['r']}, common {groups['c']}, frequent {groups['f']}")
    return result


if __name__ == "__main__":
    main()
