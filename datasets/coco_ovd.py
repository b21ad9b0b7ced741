"""COCO open-vocabulary detection: the 65 categories, their ids and the 48 base / 17 novel split (SPEC §2.2).

The one place these facts live: the evaluator's base/novel AP50, the eval-time novel boost of anchor
pre-matching (`--target_class_factor`), the demo's COCO vocabulary and the tests all read them here.
"""
from __future__ import annotations

from collections.abc import Sequence

# (COCO category id, name as the OVD jsons spell it, "B" base / "N" novel), in category-id order: the order
# of the val json's labels, so position i is label i.
COCO_OVD_TABLE: tuple[tuple[int, str, str], ...] = (
    (1, "person", "B"), (2, "bicycle", "B"), (3, "car", "B"), (4, "motorcycle", "B"), (5, "airplane", "N"),
    (6, "bus", "N"), (7, "train", "B"), (8, "truck", "B"), (9, "boat", "B"), (15, "bench", "B"),
    (16, "bird", "B"), (17, "cat", "N"), (18, "dog", "N"), (19, "horse", "B"), (20, "sheep", "B"),
    (21, "cow", "N"), (22, "elephant", "N"), (23, "bear", "B"), (24, "zebra", "B"), (25, "giraffe", "B"),
    (27, "backpack", "B"), (28, "umbrella", "N"), (31, "handbag", "B"), (32, "tie", "N"), (33, "suitcase", "B"),
    (34, "frisbee", "B"), (35, "skis", "B"), (36, "snowboard", "N"), (38, "kite", "B"), (41, "skateboard", "N"),
    (42, "surfboard", "B"), (44, "bottle", "B"), (47, "cup", "N"), (48, "fork", "B"), (49, "knife", "N"),
    (50, "spoon", "B"), (51, "bowl", "B"), (52, "banana", "B"), (53, "apple", "B"), (54, "sandwich", "B"),
    (55, "orange", "B"), (56, "broccoli", "B"), (57, "carrot", "B"), (59, "pizza", "B"), (60, "donut", "B"),
    (61, "cake", "N"), (62, "chair", "B"), (63, "couch", "N"), (65, "bed", "B"), (70, "toilet", "B"),
    (72, "tv", "B"), (73, "laptop", "B"), (74, "mouse", "B"), (75, "remote", "B"), (76, "keyboard", "N"),
    (78, "microwave", "B"), (79, "oven", "B"), (80, "toaster", "B"), (81, "sink", "N"), (82, "refrigerator", "B"),
    (84, "book", "B"), (85, "clock", "B"), (86, "vase", "B"), (87, "scissors", "N"), (90, "toothbrush", "B"),
)  # fmt: skip

COCO_OVD_CATEGORIES: tuple[str, ...] = tuple(name for _, name, _ in COCO_OVD_TABLE)
COCO_OVD_CATEGORY_IDS: tuple[int, ...] = tuple(cat_id for cat_id, _, _ in COCO_OVD_TABLE)
BASE_CATIDS: tuple[int, ...] = tuple(cat_id for cat_id, _, split in COCO_OVD_TABLE if split == "B")
NOVEL_CATIDS: tuple[int, ...] = tuple(cat_id for cat_id, _, split in COCO_OVD_TABLE if split == "N")
# The original's hard-coded novel label indices (`models/fast_detr.py:240`).
COCO_OVD_NOVEL_INDICES: tuple[int, ...] = tuple(i for i, (_, _, split) in enumerate(COCO_OVD_TABLE) if split == "N")


def novel_indices_for(categories: Sequence[str]) -> tuple[int, ...] | None:
    """The classes the eval-time novel boost applies to when `categories` is the COCO-OVD list (the 65
    names in label order); None for any other list (LVIS's rare classes come from its json's `frequency`)."""
    if tuple(categories) == COCO_OVD_CATEGORIES:
        return COCO_OVD_NOVEL_INDICES
    return None
