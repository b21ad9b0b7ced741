"""LVIS detection dataset, repeat-factor sampling weights and the distributed weighted sampler
(SPEC §2.1, §2.7, §6.3; not used by the shipped COCO configs).

An item is `(image, target)` like `datasets.coco.CocoDetection`'s (boxes **xyxy absolute** before
the transforms, cxcywh normalised after), plus `area` (float32, the json's areas, rescaled/recomputed
by the transforms) and `iscrowd` (int64). Labels are the raw LVIS category ids, or with `label_map`
the rank of the category id (an index into `category_list`). Images whose target has no box left
after the transforms are skipped: the next index is returned instead, as in the original.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.utils.data
from PIL import Image

from datasets.coco import (
    category_maps,
    check_image_files,
    index_coco,
    load_annotation_json,
    load_rgb_image,
    require_boxes,
    validate_detection_json,
    xywh_annotations_to_xyxy,
)
from datasets.pseudo_boxes import PseudoBoxes, append_pseudo_boxes, finish_pseudo_boxes, load_pseudo_boxes
from datasets.transforms import make_coco_transforms

LVIS_TRAIN_JSON = "lvis_v1_train_norare.json"
LVIS_VAL_JSON = "lvis_v1_val.json"
# --label_version -> training json: the original knows '' and RN50x4base (its relabelled file); RN50base is
# the RN50 CLIP-aligned labels (tools/relabel.py --dataset_file lvis --backbone clip_RN50), which it never had.
LVIS_TRAIN_JSONS = {"": LVIS_TRAIN_JSON, "RN50base": "lvis_v1_train_norare_RN50relabel.json",
                    "RN50x4base": "lvis_v1_train_norare_relabel.json"}
LVIS_VAL_NORARE_JSON = "lvis_v1_val_norare.json"

# Initial per-category image count, so that a category without images gets a finite frequency.
RFS_COUNT_START = 1e-3


def repeat_factors(
    image_categories: Sequence[Iterable[int]], category_ids: Iterable[int], threshold: float
) -> list[float]:
    """Per-image repeat factors of repeat-factor sampling.

    `f(c)` = (1e-3 + number of images containing c) / number of images, `r(c) = max(1, sqrt(t / f(c)))`,
    and an image's factor is the max of `r(c)` over the categories in it (1.0 for an image without
    annotations). `image_categories[i]` lists the category ids of image i's annotations.
    """
    counts = {c: RFS_COUNT_START for c in category_ids}
    image_sets = [set(cats) for cats in image_categories]
    for cats in image_sets:
        for c in cats:
            counts[c] += 1
    num_images = len(image_sets)
    category_repeat = {c: max(1.0, math.sqrt(threshold / (n / num_images))) for c, n in counts.items()}
    return [max((category_repeat[c] for c in cats), default=1.0) for cats in image_sets]


class LvisDetection(torch.utils.data.Dataset):
    """LVIS-format dataset over every image of `ann_file` (sorted ids); image path = the last two
    components of each image's `coco_url` (e.g. `train2017/000000391895.jpg`) under `img_folder`.

    Attributes: `coco` (pycocotools COCO index of the LVIS json), `ids`, `category_list` (names with
    `_` → space, sorted by category id), `label2catid`, `cat2label` (category id → rank, used with
    `label_map`), `num_boxes` (usable boxes), and `rep_factors` (per-image weights, only with
    `repeat_factor_sampling`). `pseudo_boxes`: CORA+ boxes per image id (`datasets.pseudo_boxes`).
    """

    def __init__(
        self,
        *,
        img_folder: str | os.PathLike,
        ann_file: str | os.PathLike,
        transforms: Callable[[Image.Image, dict], tuple[Any, dict]] | None = None,
        label_map: bool = False,
        repeat_factor_sampling: bool = False,
        repeat_threshold: float = 0.001,
        pseudo_boxes: PseudoBoxes | None = None,
    ):
        self.img_folder = Path(img_folder)
        self.ann_file = Path(ann_file)
        self._transforms = transforms
        self.label_map = label_map
        data = load_annotation_json(self.ann_file)
        self.num_boxes = validate_detection_json(data, self.ann_file, image_keys=("coco_url",),
                                                 annotation_keys=("area",))
        try:
            self.category_list, self.label2catid, self.cat2label = category_maps(
                data["categories"], rename=lambda name: name.replace("_", " ")
            )
            self.catid2label = self.cat2label  # CocoDetection's name for it
        except ValueError as e:
            raise ValueError(f"annotation file {self.ann_file}: {e}") from e
        self.coco = index_coco(data)
        self.ids = sorted(self.coco.imgs.keys())
        check_image_files(((i, self.image_path(i)) for i in self.ids), self.ann_file)
        self.pseudo_boxes = pseudo_boxes
        self.rep_factors: list[float] | None = None
        if repeat_factor_sampling:
            self.rep_factors = repeat_factors(
                [[a["category_id"] for a in self.coco.imgToAnns.get(i, [])] for i in self.ids],
                self.coco.cats.keys(),
                repeat_threshold,
            )

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def novel_indices(self) -> tuple[int, ...]:
        """Labels (indices into `category_list`) of the rare classes, from the json's `frequency`: what
        `--target_class_factor` boosts on LVIS (the original hard-codes LVIS v1's 337)."""
        cats = self.coco.cats
        missing = [c for c in self.label2catid.values() if cats[c].get("frequency") not in ("r", "c", "f")]
        if missing:
            raise ValueError(f"annotation file {self.ann_file}: categories {missing[:10]} have no 'frequency' "
                             f"('r', 'c' or 'f'); LVIS's rare classes are read from it")
        return tuple(label for label, c in self.label2catid.items() if cats[c]["frequency"] == "r")

    def image_path(self, image_id: int) -> Path:
        split_folder, file_name = self.coco.imgs[image_id]["coco_url"].split("/")[-2:]
        return self.img_folder / split_folder / file_name

    def load_image(self, image_id: int) -> Image.Image:
        return load_rgb_image(self.image_path(image_id), image_id=image_id, ann_file=self.ann_file)

    def _target(self, image_id: int, width: int, height: int) -> dict[str, torch.Tensor]:
        annotations = [a for a in self.coco.imgToAnns.get(image_id, []) if a.get("iscrowd", 0) == 0]
        boxes = xywh_annotations_to_xyxy(annotations, width, height)
        if self.label_map:
            labels = [self.cat2label[a["category_id"]] for a in annotations]
        else:
            labels = [a["category_id"] for a in annotations]
        labels = torch.tensor(labels, dtype=torch.int64)
        area = torch.tensor([a["area"] for a in annotations], dtype=torch.float32)
        iscrowd = torch.tensor([a.get("iscrowd", 0) for a in annotations], dtype=torch.int64)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        return {
            "boxes": boxes[keep],
            "labels": labels[keep],
            "image_id": torch.tensor([image_id]),
            "area": area[keep],
            "iscrowd": iscrowd[keep],
            "orig_size": torch.as_tensor([int(height), int(width)]),
            "size": torch.as_tensor([int(height), int(width)]),
        }

    def __getitem__(self, idx: int) -> tuple[Any, dict[str, Any]]:
        # The original recursed into idx + 1 (wrapping around); a loop gives the same items without
        # a recursion limit, and an error instead of endless search when no image has a box.
        for step in range(len(self)):
            image_id = self.ids[(idx + step) % len(self)]
            image = self.load_image(image_id)
            width, height = image.size
            target = self._target(image_id, width, height)
            if self.pseudo_boxes is not None:
                target = append_pseudo_boxes(target, self.pseudo_boxes.get(image_id, []), width, height)
            if self._transforms is not None:
                image, target = self._transforms(image, target)
            if self.pseudo_boxes is not None:
                target = finish_pseudo_boxes(target)
            if len(target["labels"]) > 0:
                return image, target
        raise RuntimeError(
            f"LVIS dataset {self.ann_file}: no image starting from index {idx} has a box left "
            "after the transforms"
        )


class DistributedWeightedSampler(torch.utils.data.Sampler[int]):
    """Weighted sampling with replacement, split across ranks.

    Each epoch: a generator seeded with the epoch; indices `0..N-1` padded (by repeating the first
    ones) to `ceil(N / num_replicas) * num_replicas`, rank r takes every `num_replicas`-th from r,
    then draws `ceil(N / num_replicas)` of them with `torch.multinomial(weights of those,
    replacement=replacement)`. Call `set_epoch` every epoch.
    """

    def __init__(
        self,
        *,
        weights: Sequence[float],
        num_replicas: int | None = None,
        rank: int | None = None,
        replacement: bool = True,
    ):
        if num_replicas is None or rank is None:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    "DistributedWeightedSampler: give num_replicas and rank, or initialise torch.distributed"
                )
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        if not 0 <= rank < num_replicas:
            raise ValueError(f"DistributedWeightedSampler: rank {rank} not in [0, {num_replicas})")
        if len(weights) == 0:
            raise ValueError("DistributedWeightedSampler: weights must not be empty")
        self.weights = list(weights)
        self.num_replicas = num_replicas
        self.rank = rank
        self.replacement = replacement
        self.epoch = 0
        self.num_samples = int(math.ceil(len(self.weights) / self.num_replicas))
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.epoch)
        indices = list(range(len(self.weights)))
        indices += indices[: self.total_size - len(indices)]
        indices = indices[self.rank : self.total_size : self.num_replicas]
        chosen = torch.multinomial(
            torch.tensor([self.weights[i] for i in indices]),
            self.num_samples,
            self.replacement,
            generator=generator,
        )
        return iter(torch.tensor(indices)[chosen].tolist())

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def lvis_annotation_file(root: Path, *, image_set: str, label_version: str, no_target_eval: bool) -> Path:
    if image_set == "train":
        if label_version not in LVIS_TRAIN_JSONS:
            raise ValueError(f"--label_version {label_version!r} with --dataset_file lvis: expected one of "
                             f"{sorted(LVIS_TRAIN_JSONS)} (training jsons {LVIS_TRAIN_JSONS})")
        return root / LVIS_TRAIN_JSONS[label_version]
    if image_set == "val":
        return root / (LVIS_VAL_NORARE_JSON if no_target_eval else LVIS_VAL_JSON)
    raise ValueError(f"unknown image_set {image_set!r}, expected 'train' or 'val'")


def build(image_set: str, args: Any) -> LvisDetection:
    """LVIS dataset from `args.lvis_path` (jsons and image folders), `args.label_version`,
    `args.no_target_eval`, `args.label_map`, `args.repeat_factor_sampling`, `args.repeat_threshold`,
    `args.backbone`, `args.image_scale` and (train) `args.pseudo_box`."""
    root = Path(args.lvis_path)
    if not root.exists():
        raise FileNotFoundError(f"--lvis_path {root!s} does not exist")
    ann_file = lvis_annotation_file(
        root, image_set=image_set, label_version=args.label_version, no_target_eval=args.no_target_eval
    )
    if not ann_file.is_file():
        raise FileNotFoundError(
            f"LVIS annotation file {ann_file} for the {image_set} set not found (selected by "
            f"--label_version {args.label_version!r}, --no_target_eval {args.no_target_eval})"
        )
    repeat_factor_sampling = bool(args.repeat_factor_sampling) and image_set == "train"
    # Quirk kept from the original: it passes `args.repeat_threshold and image_set == 'train'`, which
    # is the bool True (t = 1) for the train split whenever --repeat_threshold is non-zero.
    repeat_threshold = 1.0 if args.repeat_threshold else 0.0
    dataset = LvisDetection(
        img_folder=root,
        ann_file=ann_file,
        transforms=make_coco_transforms(image_set, clip_normalisation=args.backbone.startswith("clip"),
                                        image_scale=args.image_scale),
        label_map=args.label_map,
        repeat_factor_sampling=repeat_factor_sampling,
        repeat_threshold=repeat_threshold,
    )
    if image_set == "train":
        require_boxes(dataset.num_boxes, ann_file)
        if args.pseudo_box:
            dataset.pseudo_boxes = load_pseudo_boxes(args.pseudo_box, dataset.ids)
    return dataset
