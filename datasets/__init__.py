"""Datasets: COCO / COCO-OVD (`coco`) and LVIS (`lvis`), selected by `--dataset_file`."""

from __future__ import annotations

from typing import Any

import torch.utils.data
from pycocotools.coco import COCO

from datasets.coco import CocoDetection
from datasets.coco import build as build_coco
from datasets.lvis import DistributedWeightedSampler, LvisDetection
from datasets.lvis import build as build_lvis

__all__ = [
    "CocoDetection",
    "DistributedWeightedSampler",
    "LvisDetection",
    "build_dataset",
    "get_coco_api_from_dataset",
]


def get_coco_api_from_dataset(dataset: torch.utils.data.Dataset) -> COCO:
    """The pycocotools COCO index of the (possibly `Subset`-wrapped) dataset's annotation json."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    if isinstance(dataset, (CocoDetection, LvisDetection)):
        return dataset.coco
    raise TypeError(f"get_coco_api_from_dataset: {type(dataset).__name__} has no COCO annotation index")


def build_dataset(image_set: str, args: Any) -> CocoDetection | LvisDetection:
    """Build the 'train' or 'val' dataset named by `args.dataset_file` ('coco' or 'lvis')."""
    if args.dataset_file == "coco":
        return build_coco(image_set, args)
    if args.dataset_file == "lvis":
        return build_lvis(image_set, args)
    raise ValueError(f"--dataset_file {args.dataset_file!r} is not supported; expected 'coco' or 'lvis'")
