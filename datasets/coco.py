"""COCO / COCO open-vocabulary (OVD) detection dataset (SPEC §2.1–2.3).

An item is `(image, target)`. Before the transforms the image is an RGB PIL image and the target holds
`boxes` float32 `[N,4]` **xyxy in absolute pixels** (clamped to the image, crowd and empty boxes
dropped), `labels` int64 `[N]` (label = rank of the category id among the json's categories, i.e.
an index into `category_list`), `image_id` int64 `[1]`, `orig_size` = `size` = int64 `[h, w]`.
With the standard transforms the image becomes a normalised float tensor `[3,H,W]` and `boxes`
cxcywh normalised by the transformed image's size.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils.data
from PIL import Image
from pycocotools.coco import COCO

from datasets.transforms import make_coco_transforms

REQUIRED_KEYS = ("images", "annotations", "categories")

# --label_version → training json under --ovd (SPEC §2.1). 'custom' only swapped the val set to an
# unshipped folder (dead code), so it is not accepted.
OVD_TRAIN_JSON = {
    "": "instances_train2017_base.json",
    "ori": "instances_train2017_base.json",
    "RN50base": "instances_train2017_base_RN50relabel.json",
    "RN50x4base_prev": "instances_train2017_base_RN50x4relabel_pre.json",
    "RN50x4base": "instances_train2017_base_RN50x4relabel.json",
    "RN50x4base_coconames": "instances_train2017_base_RN50x4relabel_coconames.json",
}
OVD_VAL_JSON = "instances_val2017_basetarget.json"
OVD_VAL_TARGET_JSON = "instances_val2017_target.json"


def load_annotation_json(ann_file: str | os.PathLike) -> dict[str, Any]:
    """Read a COCO-format json and check that it has `images`, `annotations` and `categories`."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file {ann_file} not found")
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"annotation file {ann_file} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(
            f"annotation file {ann_file}: expected a JSON object at top level, found {type(data).__name__}"
        )
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(
            f"annotation file {ann_file}: missing key(s) {missing}; a COCO detection json needs "
            f"{list(REQUIRED_KEYS)}, found keys {sorted(data.keys())}"
        )
    return data


def _describe_annotation(ann: Any, index: int) -> str:
    if isinstance(ann, dict) and "id" in ann:
        return f"annotation id {ann['id']} (image id {ann.get('image_id', '?')})"
    return f"annotation #{index} in the list"


def validate_detection_json(
    data: dict[str, Any],
    ann_file: str | os.PathLike,
    *,
    image_keys: Sequence[str],
    annotation_keys: Sequence[str],
) -> None:
    """Check every category, image and annotation once, so that no item fails later for a reason visible now.

    Checks: categories have an int `id` (unique) and a `name`; images have an `id` (unique) and
    `image_keys`; annotations have `id`, `image_id`, `bbox` (4 finite numbers), `category_id` (one of
    the json's categories) and `annotation_keys`. Raises ValueError naming the file and the offending id.
    """
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or "name" not in cat:
            raise ValueError(
                f"annotation file {ann_file}: category #{i} must have an int 'id' and a 'name', found {cat!r}"
            )
    category_ids = [c["id"] for c in data["categories"]]
    if len(set(category_ids)) != len(category_ids):
        dup = sorted({c for c in category_ids if category_ids.count(c) > 1})
        raise ValueError(f"annotation file {ann_file}: duplicate category id(s) {dup}")
    known_categories = set(category_ids)

    seen_images: set[Any] = set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img:
            raise ValueError(f"annotation file {ann_file}: image #{i} has no 'id', found {img!r}")
        for key in image_keys:
            if key not in img:
                raise ValueError(f"annotation file {ann_file}: image id {img['id']} has no {key!r}")
        if img["id"] in seen_images:
            raise ValueError(f"annotation file {ann_file}: image id {img['id']} is listed twice")
        seen_images.add(img["id"])

    required = ("id", "image_id", "bbox", "category_id", *annotation_keys)
    for i, ann in enumerate(data["annotations"]):
        where = _describe_annotation(ann, i)
        if not isinstance(ann, dict):
            raise ValueError(f"annotation file {ann_file}: {where} is not an object: {ann!r}")
        for key in required:
            if key not in ann:
                raise ValueError(f"annotation file {ann_file}: {where} has no {key!r}")
        bbox = ann["bbox"]
        if (
            not isinstance(bbox, (list, tuple))
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
        ):
            raise ValueError(
                f"annotation file {ann_file}: {where}: 'bbox' must be 4 numbers [x, y, w, h], found {bbox!r}"
            )
        if not all(math.isfinite(v) for v in bbox):
            raise ValueError(f"annotation file {ann_file}: {where}: 'bbox' has non-finite values {bbox!r}")
        if ann["category_id"] not in known_categories:
            raise ValueError(
                f"annotation file {ann_file}: {where} has category_id {ann['category_id']!r}, "
                f"which is not among the file's {len(known_categories)} categories"
            )


def category_maps(
    categories: Iterable[dict[str, Any]], rename: Callable[[str], str] | None = None
) -> tuple[list[str], dict[int, int], dict[int, int]]:
    """`(category_list, label2catid, catid2label)`: names sorted by category id; label = rank of the id.

    The original derives label2catid through the names, which is the same mapping when names are
    unique; duplicate names would silently merge two classes there, so they are rejected here.
    """
    id_to_name = {c["id"]: (rename(c["name"]) if rename else c["name"]) for c in categories}
    sorted_ids = sorted(id_to_name)
    category_list = [id_to_name[i] for i in sorted_ids]
    if len(set(category_list)) != len(category_list):
        dup = sorted({n for n in category_list if category_list.count(n) > 1})
        raise ValueError(f"duplicate category name(s) {dup}: the text classifier could not tell them apart")
    label2catid = dict(enumerate(sorted_ids))
    catid2label = {c: label for label, c in label2catid.items()}
    return category_list, label2catid, catid2label


def index_coco(data: dict[str, Any]) -> COCO:
    """A pycocotools COCO index over already-loaded json data (no second read of the file)."""
    coco = COCO()
    coco.dataset = data
    coco.createIndex()
    return coco


def load_rgb_image(path: str | os.PathLike, *, image_id: Any, ann_file: str | os.PathLike) -> Image.Image:
    """Decode an image file once and convert it to RGB (grayscale, RGBA, palette, CMYK, ...)."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"image file {path} not found (image id {image_id} of {ann_file})") from e
    except OSError as e:
        raise OSError(f"cannot read image file {path} (image id {image_id} of {ann_file}): {e}") from e


def xywh_annotations_to_xyxy(annotations: Sequence[dict[str, Any]], width: int, height: int) -> torch.Tensor:
    """float32 `[N,4]` xyxy boxes from COCO `[x, y, w, h]`, clamped to the image.

    x + w is computed in float32, as in the original.
    """
    boxes = torch.as_tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2].clamp_(min=0, max=width)
    boxes[:, 1::2].clamp_(min=0, max=height)
    return boxes


def make_coco_target(
    annotations: Sequence[dict[str, Any]],
    *,
    image_id: int,
    width: int,
    height: int,
    catid2label: dict[int, int],
) -> dict[str, torch.Tensor]:
    """The original's target: crowd dropped, xyxy clamped, boxes with x2<=x1 or y2<=y1 dropped."""
    annotations = [a for a in annotations if a.get("iscrowd", 0) == 0]
    boxes = xywh_annotations_to_xyxy(annotations, width, height)
    labels = torch.tensor([catid2label[a["category_id"]] for a in annotations], dtype=torch.int64)
    keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
    return {
        "boxes": boxes[keep],
        "labels": labels[keep],
        "image_id": torch.tensor([image_id]),
        "orig_size": torch.as_tensor([int(height), int(width)]),
        "size": torch.as_tensor([int(height), int(width)]),
    }


class CocoDetection(torch.utils.data.Dataset):
    """COCO-format detection dataset: every image listed in `ann_file`, in increasing image id order.

    Attributes: `coco` (pycocotools COCO index of the json), `ids` (sorted image ids),
    `category_list` (names sorted by category id, given to the text classifier), `label2catid`,
    `catid2label`. All annotations are validated when the dataset is built.
    """

    def __init__(
        self,
        *,
        img_folder: str | os.PathLike,
        ann_file: str | os.PathLike,
        transforms: Callable[[Image.Image, dict], tuple[Any, dict]] | None = None,
    ):
        self.img_folder = Path(img_folder)
        self.ann_file = Path(ann_file)
        self._transforms = transforms
        data = load_annotation_json(self.ann_file)
        validate_detection_json(data, self.ann_file, image_keys=("file_name",), annotation_keys=())
        try:
            self.category_list, self.label2catid, self.catid2label = category_maps(data["categories"])
        except ValueError as e:
            raise ValueError(f"annotation file {self.ann_file}: {e}") from e
        self.coco = index_coco(data)
        self.ids = sorted(self.coco.imgs.keys())

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, image_id: int) -> Image.Image:
        path = self.img_folder / self.coco.imgs[image_id]["file_name"]
        return load_rgb_image(path, image_id=image_id, ann_file=self.ann_file)

    def __getitem__(self, idx: int) -> tuple[Any, dict[str, Any]]:
        image_id = self.ids[idx]
        image = self.load_image(image_id)
        width, height = image.size
        target = make_coco_target(
            self.coco.imgToAnns.get(image_id, []),
            image_id=image_id,
            width=width,
            height=height,
            catid2label=self.catid2label,
        )
        if self._transforms is not None:
            image, target = self._transforms(image, target)
        return image, target


def ovd_annotation_files(
    root: Path, *, label_version: str, eval_target: bool
) -> dict[str, tuple[Path, Path, str]]:
    """`{image_set: (image folder, json, why this json)}` for `--ovd` (SPEC §2.1)."""
    if label_version not in OVD_TRAIN_JSON:
        raise ValueError(
            f"unknown --label_version {label_version!r}; expected one of {sorted(OVD_TRAIN_JSON)} "
            "(the original's 'custom' val set is not supported)"
        )
    ann = root / "annotations"
    val_json, val_why = (
        (OVD_VAL_TARGET_JSON, "--ovd --eval_target") if eval_target else (OVD_VAL_JSON, "--ovd")
    )
    return {
        "train": (
            root / "train2017",
            ann / OVD_TRAIN_JSON[label_version],
            f"--ovd --label_version {label_version!r}",
        ),
        "val": (root / "val2017", ann / val_json, val_why),
    }


def build(image_set: str, args: Any) -> CocoDetection:
    """Dataset for `image_set` ('train' / 'val').

    Reads `args.coco_path`, `args.ovd`, `args.label_version`, `args.eval_target`, `args.backbone`
    (a backbone name starting with 'clip' selects CLIP normalisation) and `args.image_scale` (optional).
    """
    root = Path(args.coco_path)
    if not root.exists():
        raise FileNotFoundError(f"--coco_path {root} does not exist")
    if args.ovd:
        paths = ovd_annotation_files(root, label_version=args.label_version, eval_target=args.eval_target)
    else:
        paths = {
            split: (root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json", "no --ovd")
            for split in ("train", "val")
        }
    if image_set not in paths:
        raise ValueError(f"unknown image_set {image_set!r}, expected 'train' or 'val'")
    img_folder, ann_file, why = paths[image_set]
    if not ann_file.is_file():
        raise FileNotFoundError(
            f"annotation file {ann_file} for the {image_set} set (selected by {why}) not found"
        )
    transforms = make_coco_transforms(image_set, clip_normalisation=args.backbone.startswith("clip"),
                                      image_scale=getattr(args, "image_scale", 1.0))
    return CocoDetection(img_folder=img_folder, ann_file=ann_file, transforms=transforms)
