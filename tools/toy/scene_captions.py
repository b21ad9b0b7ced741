"""COCO-style captions of the toy world's training scenes, for CORA+ in miniature.

    python -m tools.toy.scene_captions --data data/toy      # -> data/toy/annotations/captions_train2017.json

COCO's captions name the salient objects of a picture, novel classes included (that is where CORA+'s
image-level tags come from); they do not list every object. Here each training scene gets two captions
written from its full annotation (`instances_train2017_all.json`, boxes of every class): each names
each object with probability 0.6, in order of decreasing size, the first caption always naming the
largest one ("a picture of a star, a ring and a heart."). The result
is in COCO's captions format (`images`, `annotations` of `{id, image_id, caption}`) and is a function
of the annotation and `--seed` only (its own random stream per image).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tools.toy.make_dataset import TRAIN_ALL_JSON  # noqa: E402
from util.atomic import write_json  # noqa: E402

CAPTIONS_JSON = "captions_train2017.json"
CAPTIONS_PER_IMAGE = 2
MENTION_PROBABILITY = 0.6
_STREAM = 5  # after make_dataset's four streams (train, val, clip_train, clip_test)


def scene_captions(annotations: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    names = {c["id"]: c["name"] for c in annotations["categories"]}
    by_image: dict[int, list[dict]] = {img["id"]: [] for img in annotations["images"]}
    for a in annotations["annotations"]:
        by_image[a["image_id"]].append(a)
    captions = []
    for image_id in sorted(by_image):
        objects = sorted(by_image[image_id], key=lambda a: -a["bbox"][2] * a["bbox"][3])
        if not objects:
            continue
        rng = np.random.default_rng([seed, _STREAM, image_id])
        for k in range(CAPTIONS_PER_IMAGE):
            named = [o for i, o in enumerate(objects)
                     if (k == 0 and i == 0) or rng.random() < MENTION_PROBABILITY]
            if not named:
                continue
            words = [names[o["category_id"]] for o in named]
            listed = ", ".join(f"a {w}" for w in words[:-1]) + (" and " if len(words) > 1 else "") + f"a {words[-1]}"
            text = listed if rng.random() < 0.5 else f"a picture of {listed}."
            captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": text})
    return {"images": annotations["images"], "annotations": captions}


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/toy", help="the toy world (tools/toy/make_dataset.py's --out)")
    p.add_argument("--seed", default=0, type=int)
    args = p.parse_args(argv)
    source = Path(args.data) / "annotations" / TRAIN_ALL_JSON
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found: make the world first (python -m tools.toy.make_dataset)")
    out = Path(args.data) / "annotations" / CAPTIONS_JSON
    data = scene_captions(json.loads(source.read_text()), args.seed)
    write_json(data, out)
    print(f"{len(data['annotations'])} captions of {len(data['images'])} training scenes -> {out}")
    return out


if __name__ == "__main__":
    main()
