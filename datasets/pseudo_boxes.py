"""CORA+ pseudo boxes in training (`--pseudo_box FILE`, SPEC §2.2–2.3).

The file is what `tools/pseudo_label.py` writes (the original's `export_pseudo_label.py` format): a
JSON list of `{"image_id": int, "bbox": [x, y, w, h] in pixels of the image, "class_label": name,
"score": float}`. Each image's pseudo boxes are appended to its ground-truth boxes before the
transforms; afterwards a pseudo box is kept only if its IoU with every ground-truth box is < 0.5,
and its class name goes to `target['pseudo_labels']`. Pseudo boxes come last in `boxes` and carry the
label `PSEUDO_LABEL` until the engine appends the batch's pseudo names to the category list and
labels them (`engine.with_pseudo_categories`).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from util.box_ops import box_cxcywh_to_xyxy, box_iou

PSEUDO_LABEL = -1  # label of a pseudo box from the dataset until the engine names its class
PSEUDO_IOU = 0.5  # a pseudo box overlapping a ground-truth box this much (or more) is dropped

PseudoBoxes = dict[int, list[dict[str, Any]]]


def load_pseudo_boxes(path: str | os.PathLike, image_ids: Iterable[int]) -> PseudoBoxes:
    """`{image_id: [{'bbox': [x, y, w, h], 'class_label': name, 'score': s}, ...]}` from a pseudo-box file,
    checked completely: every entry must name an image of the training json (`image_ids`), a class
    (non-empty string) and a box of 4 finite numbers with positive width and height."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--pseudo_box {path}: file not found (tools/pseudo_label.py writes it)")
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--pseudo_box {path}: not valid JSON ({e})") from e
    if not isinstance(entries, list):
        raise ValueError(f"--pseudo_box {path}: expected a JSON list of {{image_id, bbox, class_label, score}}, "
                         f"found {type(entries).__name__}")
    known = set(image_ids)
    boxes: PseudoBoxes = {}
    unknown: list[Any] = []
    for i, entry in enumerate(entries):
        where = f"--pseudo_box {path}: entry #{i}"
        if not isinstance(entry, Mapping) or not {"image_id", "bbox", "class_label"} <= set(entry):
            raise ValueError(f"{where} needs 'image_id', 'bbox' and 'class_label', found {entry!r}"[:300])
        bbox = entry["bbox"]
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            raise ValueError(f"{where} (image {entry['image_id']}): 'bbox' must be 4 numbers [x, y, w, h], "
                             f"found {bbox!r}")
        if not all(math.isfinite(v) for v in bbox):
            raise ValueError(f"{where} (image {entry['image_id']}): 'bbox' has non-finite values {bbox!r}")
        if not (bbox[2] > 0 and bbox[3] > 0):
            raise ValueError(f"{where} (image {entry['image_id']}): 'bbox' {bbox!r} has no area (w, h must be > 0)")
        name = entry["class_label"]
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{where} (image {entry['image_id']}): 'class_label' must be a class name, "
                             f"found {name!r}")
        if entry["image_id"] not in known:
            unknown.append(entry["image_id"])
            continue
        boxes.setdefault(entry["image_id"], []).append(
            {"bbox": [float(v) for v in bbox], "class_label": name, "score": entry.get("score")})
    if unknown:
        shown = sorted(set(unknown), key=str)[:10]
        raise ValueError(f"--pseudo_box {path}: {len(unknown)} of {len(entries)} boxes name image ids that the "
                         f"training json does not list (e.g. {shown}); was the file made for another dataset?")
    return boxes


def append_pseudo_boxes(target: dict[str, Any], pseudo: Sequence[dict[str, Any]], width: int,
                        height: int) -> dict[str, Any]:
    """Append an image's pseudo boxes (xyxy, clamped to the image; boxes left without area dropped)
    to a dataset target, labelled `-(i + 1)` so that each can be traced through the transforms."""
    if not pseudo:
        return {**target, "pseudo_names": []}
    xywh = torch.as_tensor([p["bbox"] for p in pseudo], dtype=torch.float32)
    xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
    xyxy[:, 0::2].clamp_(min=0, max=width)
    xyxy[:, 1::2].clamp_(min=0, max=height)
    labels = -torch.arange(1, len(pseudo) + 1, dtype=torch.int64)
    keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    out = {**target, "boxes": torch.cat([target["boxes"], xyxy[keep]]),
           "labels": torch.cat([target["labels"], labels[keep]]),
           "pseudo_names": [p["class_label"] for p in pseudo]}
    if "area" in target:
        out["area"] = torch.cat([target["area"], (xywh[:, 2] * xywh[:, 3])[keep]])
    if "iscrowd" in target:
        out["iscrowd"] = torch.cat([target["iscrowd"], torch.zeros(int(keep.sum()), dtype=target["iscrowd"].dtype)])
    return out


def finish_pseudo_boxes(target: dict[str, Any]) -> dict[str, Any]:
    """After the transforms (boxes cxcywh, normalised): drop pseudo boxes with IoU >= 0.5 with a
    ground-truth box, label the others `PSEUDO_LABEL` and list their names in `pseudo_labels`."""
    names = target.pop("pseudo_names")
    labels = target["labels"]
    is_pseudo = labels < 0
    boxes = box_cxcywh_to_xyxy(target["boxes"])
    gt, pseudo = boxes[~is_pseudo], boxes[is_pseudo]
    if len(gt) and len(pseudo):
        overlap_ok = box_iou(pseudo, gt)[0].max(dim=1).values < PSEUDO_IOU
    else:
        overlap_ok = torch.ones(len(pseudo), dtype=torch.bool)
    keep = ~is_pseudo
    keep[is_pseudo] = overlap_ok
    kept_names = [names[-int(label) - 1] for label in labels[is_pseudo][overlap_ok]]
    out = {k: (v[keep] if k in ("boxes", "labels", "area", "iscrowd") and torch.is_tensor(v) and len(v) == len(keep)
               else v) for k, v in target.items()}
    out["labels"] = torch.where(out["labels"] < 0, torch.full_like(out["labels"], PSEUDO_LABEL), out["labels"])
    out["pseudo_labels"] = kept_names
    return out
