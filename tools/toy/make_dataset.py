"""Write the miniature world: a COCO-OVD detection set and an image-text set for CLIP pretraining.

    python -m tools.toy.make_dataset --out data/toy                 # defaults below, seed 0
    python -m tools.toy.make_dataset --out /tmp/t --train 40 --val 10 --captions 200 --test_per_class 2

Layout under `--out` (the one `--coco_path` with `--ovd` expects, plus the CLIP data):

    train2017/<12-digit id>.jpg, val2017/<12-digit id>.jpg       256x256 scenes of 1-6 objects
    annotations/instances_train2017_base.json       base boxes only, base categories (the training json)
    annotations/instances_train2017_all.json        every box (not used by the pipeline; oracle / inspection)
    annotations/instances_val2017_basetarget.json   every box, all 16 categories (evaluation)
    clip/train/<6-digit>.jpg + clip/captions_train.json   image-text pairs naming every class, novel included,
                                                    and per object a box and its own caption (region-text pairs)
    clip/test/<6-digit>.jpg + clip/labels_test.json       held-out single-object crops (zero-shot accuracy)
    toy_world.json                                  what was generated (seed, counts, classes, resolution)

Categories carry `"split": "base" | "novel"`; the evaluator and the region-accuracy report use it
when present. Training images contain novel objects without boxes, as COCO's do. Every image is a
function of (seed, split, index) only, so the output is the same for any `--workers`.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.toy.world import CLASS_NAMES, CLASSES, caption_for, render_crop, render_scene  # noqa: E402

JPEG_QUALITY = 92
# Stream ids of numpy's SeedSequence: one independent stream per split.
_STREAMS = {"train": 1, "val": 2, "clip_train": 3, "clip_test": 4}
TRAIN_BASE_JSON = "instances_train2017_base.json"
TRAIN_ALL_JSON = "instances_train2017_all.json"
VAL_JSON = "instances_val2017_basetarget.json"


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS[split], index])


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _scene_job(args: tuple[int, str, int, int]) -> tuple[bytes, list[tuple[str, list[int], int]]]:
    seed, split, index, size = args
    image, objects = render_scene(image_rng(seed, split, index), height=size, width=size)
    return _jpeg(image), [(o.name, o.box(), int(o.mask.sum())) for o in objects]


def _crop_job(args: tuple[int, str, int, int]) -> tuple[bytes, str, list[str], list[dict[str, Any]]]:
    seed, split, index, resolution = args
    rng = image_rng(seed, split, index)
    if split == "clip_test":
        # balanced: class by index, one object, no scene
        name = CLASS_NAMES[index % len(CLASS_NAMES)]
        image, objects = render_crop(rng, resolution=resolution, name=name)
        return _jpeg(image), caption_for(rng, objects), [o.name for o in objects], []
    image, objects = render_crop(rng, resolution=resolution)
    caption = caption_for(rng, objects)
    # one caption per object too, drawn after the image's: region-text pairs (tools/toy/train_clip.py)
    regions = [{"box": o.box(), "caption": caption_for(rng, [o])} for o in objects]
    return _jpeg(image), caption, [o.name for o in objects], regions


def _map(fn, jobs: list, workers: int) -> Iterator:
    if workers <= 1:
        return map(fn, jobs)
    pool = ProcessPoolExecutor(workers)
    # the generator closes the pool once consumed
    def run() -> Iterator:
        with pool:
            yield from pool.map(fn, jobs, chunksize=64)
    return run()


def categories(split: str | None = None) -> list[dict[str, Any]]:
    return [{"id": c.id, "name": c.name, "supercategory": "shape", "split": c.split}
            for c in CLASSES if split is None or c.split == split]


def write_detection_split(out: Path, split: str, count: int, *, seed: int, size: int, workers: int,
                          first_ann_id: int) -> tuple[list[dict], list[dict]]:
    folder = out / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    cat_id = {c.name: c.id for c in CLASSES}
    images, annotations = [], []
    ann_id = first_ann_id
    jobs = [(seed, split, i, size) for i in range(count)]
    for i, (jpeg, objects) in enumerate(_map(_scene_job, jobs, workers)):
        image_id = i + 1
        file_name = f"{image_id:012d}.jpg"
        (folder / file_name).write_bytes(jpeg)
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
        for name, (x, y, w, h), area in objects:
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": cat_id[name], "bbox": [x, y, w, h],
                                "area": float(area), "iscrowd": 0})
            ann_id += 1
    return images, annotations


def write_caption_split(out: Path, split: str, count: int, *, seed: int, resolution: int,
                        workers: int) -> list[dict[str, Any]]:
    folder = out / "clip" / ("train" if split == "clip_train" else "test")
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    jobs = [(seed, split, i, resolution) for i in range(count)]
    for i, (jpeg, caption, names, regions) in enumerate(_map(_crop_job, jobs, workers)):
        file_name = f"{i:06d}.jpg"
        (folder / file_name).write_bytes(jpeg)
        record = {"file_name": file_name, "caption": caption, "names": names}
        if regions:
            record["regions"] = regions
        records.append(record)
    return records


def _dump(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def make_dataset(*, out: str | os.PathLike, seed: int = 0, train: int = 2000, val: int = 400, captions: int = 16000,
                 test_per_class: int = 50, image_size: int = 256, crop_resolution: int = 96,
                 workers: int = 1) -> dict[str, Any]:
    """Write everything (see the module docstring); returns the `toy_world.json` record with timings."""
    out = Path(out)
    tic = time.time()
    info = {"description": f"toy open-vocabulary world, seed {seed}", "version": 1}
    train_images, train_anns = write_detection_split(out, "train", train, seed=seed, size=image_size,
                                                     workers=workers, first_ann_id=1)
    val_images, val_anns = write_detection_split(out, "val", val, seed=seed, size=image_size, workers=workers,
                                                 first_ann_id=len(train_anns) + 1)
    base_ids = {c.id for c in CLASSES if c.split == "base"}
    ann = out / "annotations"
    _dump({"info": info, "images": train_images, "categories": categories("base"),
           "annotations": [a for a in train_anns if a["category_id"] in base_ids]}, ann / TRAIN_BASE_JSON)
    _dump({"info": info, "images": train_images, "categories": categories(), "annotations": train_anns},
          ann / TRAIN_ALL_JSON)
    _dump({"info": info, "images": val_images, "categories": categories(), "annotations": val_anns}, ann / VAL_JSON)
    detection_s = time.time() - tic

    tic = time.time()
    caption_records = write_caption_split(out, "clip_train", captions, seed=seed, resolution=crop_resolution,
                                          workers=workers)
    _dump({"info": info, "resolution": crop_resolution, "images": caption_records},
          out / "clip" / "captions_train.json")
    test_records = write_caption_split(out, "clip_test", test_per_class * len(CLASSES), seed=seed,
                                       resolution=crop_resolution, workers=workers)
    _dump({"info": info, "resolution": crop_resolution, "images": test_records}, out / "clip" / "labels_test.json")
    record = {
        "seed": seed, "image_size": image_size, "crop_resolution": crop_resolution,
        "counts": {"train_images": train, "val_images": val, "train_boxes_all": len(train_anns),
                   "train_boxes_base": sum(a["category_id"] in base_ids for a in train_anns),
                   "val_boxes": len(val_anns), "captions": captions, "test_crops": len(test_records)},
        "classes": categories(),
        "seconds": {"detection": round(detection_s, 2), "captions": round(time.time() - tic, 2)},
    }
    _dump(record, out / "toy_world.json")
    return record


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("toy world dataset", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/toy", type=str)
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--train", default=2000, type=int, help="detection training images")
    p.add_argument("--val", default=400, type=int, help="detection validation images")
    p.add_argument("--captions", default=16000, type=int, help="image-text pairs for CLIP")
    p.add_argument("--test_per_class", default=50, type=int, help="held-out single-object crops per class")
    p.add_argument("--image_size", default=256, type=int)
    p.add_argument("--crop_resolution", default=96, type=int, help="CLIP input size: 32 x the attention-pool grid")
    p.add_argument("--workers", default=min(2, os.cpu_count() or 1), type=int)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    record = make_dataset(out=args.out, seed=args.seed, train=args.train, val=args.val, captions=args.captions,
                          test_per_class=args.test_per_class, image_size=args.image_size,
                          crop_resolution=args.crop_resolution, workers=args.workers)
    print(json.dumps({k: record[k] for k in ("counts", "seconds")}))
    return record


if __name__ == "__main__":
    main()
