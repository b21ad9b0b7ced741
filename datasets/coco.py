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

from datasets.coco_ovd import novel_indices_for
from datasets.pseudo_boxes import PseudoBoxes, append_pseudo_boxes, finish_pseudo_boxes, load_pseudo_boxes
from datasets.transforms import make_coco_transforms
from util.image import to_rgb

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
) -> int:
    """Check every category, image and annotation once, so that no item fails later for a reason visible now.

    Checks: categories have an int `id` (unique) and a `name`; images have an `id` (unique) and
    `image_keys`; annotations have `id`, `image_id`, `bbox` (4 finite numbers), `category_id` (one of
    the json's categories) and `annotation_keys`. Raises ValueError naming the file and the offending id.
    Returns the number of non-crowd boxes with a positive width and height (the ones training sees);
    boxes without area are counted and reported once here (the dataset drops them, as the original).
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
    usable, no_area = 0, []
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
        if ann.get("iscrowd", 0) == 0:
            if bbox[2] > 0 and bbox[3] > 0:
                usable += 1
            else:
                no_area.append(ann["id"])
    if no_area:
        print(f"annotation file {ann_file}: {len(no_area)} box(es) with zero or negative width or height are "
              f"ignored (annotation ids {no_area[:10]}{' ...' if len(no_area) > 10 else ''})", flush=True)
    return usable


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


def check_image_files(paths: Iterable[tuple[Any, Path]], ann_file: str | os.PathLike) -> None:
    """Every image the json lists must exist: found now, not when its batch comes up mid-epoch.
    `paths` holds `(image id, file path)`."""
    missing = [(image_id, path) for image_id, path in paths if not path.is_file()]
    if missing:
        shown = ", ".join(f"{path} (image id {image_id})" for image_id, path in missing[:5])
        raise FileNotFoundError(f"annotation file {ann_file}: {len(missing)} listed image file(s) not found: "
                                f"{shown}{' ...' if len(missing) > 5 else ''}")


def require_boxes(num_boxes: int, ann_file: str | os.PathLike) -> None:
    """A training json must hold at least one usable box: without, the losses are 0 and nothing is learned."""
    if num_boxes == 0:
        raise ValueError(f"annotation file {ann_file}: no box to train on (every annotation is crowd or has no "
                         f"area, or there is none); is this the right training json?")


def load_rgb_image(path: str | os.PathLike, *, image_id: Any, ann_file: str | os.PathLike) -> Image.Image:
    """Decode an image file once and convert it to 8-bit RGB (grayscale, 16-bit grayscale, RGBA, palette, CMYK:
    `util.image.to_rgb`)."""
    try:
        with Image.open(path) as img:
            return to_rgb(img, what=f"image file {path} (image id {image_id} of {ann_file})")
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
    `catid2label`, `num_boxes` (usable boxes). All annotations are validated and every listed image
    file is checked to exist when the dataset is built. `pseudo_boxes` (CORA+, `datasets.pseudo_boxes`):
    per image id, boxes appended to the ground truth; targets then carry `pseudo_labels`.
    """

    def __init__(
        self,
        *,
        img_folder: str | os.PathLike,
        ann_file: str | os.PathLike,
        transforms: Callable[[Image.Image, dict], tuple[Any, dict]] | None = None,
        pseudo_boxes: PseudoBoxes | None = None,
    ):
        self.img_folder = Path(img_folder)
        self.ann_file = Path(ann_file)
        self._transforms = transforms
        data = load_annotation_json(self.ann_file)
        self.num_boxes = validate_detection_json(data, self.ann_file, image_keys=("file_name",), annotation_keys=())
        try:
            self.category_list, self.label2catid, self.catid2label = category_maps(data["categories"])
        except ValueError as e:
            raise ValueError(f"annotation file {self.ann_file}: {e}") from e
        self.coco = index_coco(data)
        self.ids = sorted(self.coco.imgs.keys())
        check_image_files(((i, self.image_path(i)) for i in self.ids), self.ann_file)
        self.pseudo_boxes = pseudo_boxes

    @property
    def novel_indices(self) -> tuple[int, ...] | None:
        """Labels of the novel classes (what `--target_class_factor` boosts): the categories the json
        marks `"split": "novel"` (`datasets.ovd_eval.ovd_split`), else COCO-OVD's 17 when the list is its 65."""
        from datasets.ovd_eval import ovd_split

        cats = self.coco.dataset["categories"]
        if any("split" in c for c in cats):
            _, novel = ovd_split(cats)
            return tuple(label for label, cat_id in self.label2catid.items() if cat_id in novel) or None
        return novel_indices_for(self.category_list)

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, image_id: int) -> Path:
        return self.img_folder / self.coco.imgs[image_id]["file_name"]

    def load_image(self, image_id: int) -> Image.Image:
        return load_rgb_image(self.image_path(image_id), image_id=image_id, ann_file=self.ann_file)

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
        if self.pseudo_boxes is not None:
            target = append_pseudo_boxes(target, self.pseudo_boxes.get(image_id, []), width, height)
        if self._transforms is not None:
            image, target = self._transforms(image, target)
        if self.pseudo_boxes is not None:
            target = finish_pseudo_boxes(target)
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
    (a backbone name starting with 'clip' selects CLIP normalisation), `args.image_scale` and, for the
    train set, `args.pseudo_box` (CORA+ pseudo boxes, '' for none). A train set without any box is refused.
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
                                      image_scale=args.image_scale)
    dataset = CocoDetection(img_folder=img_folder, ann_file=ann_file, transforms=transforms)
    if image_set == "train":
        require_boxes(dataset.num_boxes, ann_file)
        if args.pseudo_box:
            dataset.pseudo_boxes = load_pseudo_boxes(args.pseudo_box, dataset.ids)
    return dataset
