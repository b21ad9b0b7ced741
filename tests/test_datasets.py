"""datasets/coco.py, lvis.py and __init__.py on the tiny on-disk data of tests/tiny_coco.py."""

from __future__ import annotations

import argparse
import copy
import json
import math
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import build_dataset, get_coco_api_from_dataset
from datasets.coco import CocoDetection
from datasets.lvis import DistributedWeightedSampler, LvisDetection, repeat_factors
from datasets.transforms import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, val_resize_hw
from tests.helpers import parsed_args
from tests.tiny_coco import make_tiny_coco

# From SPEC §2.2 (the 65-way label index of the val json, and the hard-coded novel ids / indices).
SPEC_VAL_LABELS = {1: 0, 5: 4, 9: 8, 15: 9, 28: 21, 63: 47, 65: 48, 84: 60, 87: 63, 90: 64}
SPEC_NOVEL_IDS = [28, 21, 47, 6, 76, 41, 18, 63, 32, 36, 81, 22, 61, 87, 5, 17, 49]
SPEC_NOVEL_INDICES = [4, 5, 11, 12, 15, 16, 21, 23, 27, 29, 32, 34, 45, 47, 54, 58, 63]
# Ranks among the 48 base ids 1,2,3,4,7,8,9,15,... counted by hand.
HAND_BASE_LABELS = {1: 0, 4: 3, 7: 4, 15: 7, 27: 14, 90: 47}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Read-only tiny dataset shared by the tests that do not modify files."""
    return make_tiny_coco(tmp_path_factory.mktemp("tiny_coco"), seed=0)


@pytest.fixture
def tiny_rw(tmp_path):
    """A private copy for tests that modify files."""
    return make_tiny_coco(tmp_path / "coco", seed=0)


def coco_args(root, **overrides) -> argparse.Namespace:
    return parsed_args("--coco_path", str(root), "--ovd", "--backbone", "clip_RN50", **overrides)


def write_json(path: Path, data) -> Path:
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def expected_xyxy(ann, width, height):
    x, y, w, h = ann["bbox"]
    return [
        min(max(x, 0), width),
        min(max(y, 0), height),
        min(max(x + w, 0), width),
        min(max(y + h, 0), height),
    ]


# ----------------------------------------------------------------------------- tiny data itself


def test_tiny_coco_is_deterministic_and_complete(tiny, tmp_path):
    again = make_tiny_coco(tmp_path / "again", seed=0)
    assert again["gt"] == tiny["gt"]
    for split in ("train", "val"):
        for img in tiny["gt"][split]["images"]:
            a = (tiny["image_dirs"][split] / img["file_name"]).read_bytes()
            b = (again["image_dirs"][split] / img["file_name"]).read_bytes()
            assert a == b
            with Image.open(tiny["image_dirs"][split] / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"])
                assert im.mode == tiny["modes"][img["id"]]
    assert {m for m in tiny["modes"].values()} >= {"RGB", "L", "RGBA"}
    assert len(tiny["gt"]["train"]["categories"]) == 48 and len(tiny["gt"]["val"]["categories"]) == 65
    for split in ("train", "val"):
        anns = tiny["gt"][split]["annotations"]
        assert sum(a["iscrowd"] for a in anns) == 1
        assert len({img["id"] for img in tiny["gt"][split]["images"]} - {a["image_id"] for a in anns}) == 1
    assert make_tiny_coco(tmp_path / "other", seed=1)["gt"] != tiny["gt"]


# ----------------------------------------------------------------------------- categories and targets


def test_val_categories_and_labels_follow_spec(tiny):
    ds = CocoDetection(img_folder=tiny["image_dirs"]["val"], ann_file=tiny["ann_files"]["val_basetarget"])
    assert len(ds.category_list) == 65
    assert ds.category_list[:5] == ["person", "bicycle", "car", "motorcycle", "airplane"]
    assert (
        ds.category_list[-1] == "toothbrush"
        and ds.category_list[50] == "tv"
        and ds.category_list[47] == "couch"
    )
    for cat_id, label in SPEC_VAL_LABELS.items():
        assert ds.catid2label[cat_id] == label and ds.label2catid[label] == cat_id
    assert sorted(ds.catid2label[c] for c in SPEC_NOVEL_IDS) == SPEC_NOVEL_INDICES


def test_train_categories_are_ranks_among_the_48_base_ids(tiny):
    ds = CocoDetection(img_folder=tiny["image_dirs"]["train"], ann_file=tiny["ann_files"]["train_base"])
    assert len(ds.category_list) == 48
    for cat_id, label in HAND_BASE_LABELS.items():
        assert ds.catid2label[cat_id] == label and ds.label2catid[label] == cat_id
    assert ds.category_list[4] == "train" and ds.category_list[47] == "toothbrush"


@pytest.mark.parametrize("split,ann_key", [("train", "train_base"), ("val", "val_basetarget")])
def test_targets_match_ground_truth(tiny, split, ann_key):
    gt = tiny["gt"][split]
    ds = CocoDetection(img_folder=tiny["image_dirs"][split], ann_file=tiny["ann_files"][ann_key])
    assert ds.ids == sorted(img["id"] for img in gt["images"])
    sorted_cat_ids = sorted(c["id"] for c in gt["categories"])
    for idx, image_id in enumerate(ds.ids):
        info = next(img for img in gt["images"] if img["id"] == image_id)
        anns = [a for a in gt["annotations"] if a["image_id"] == image_id and not a["iscrowd"]]
        image, target = ds[idx]
        assert image.mode == "RGB" and image.size == (info["width"], info["height"])
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
        assert target["boxes"].shape == (len(anns), 4)
        expected = [
            [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
            for a in anns
        ]
        assert target["boxes"].tolist() == expected
        assert target["labels"].tolist() == [sorted_cat_ids.index(a["category_id"]) for a in anns]
        assert target["image_id"].tolist() == [image_id]
        assert target["orig_size"].tolist() == target["size"].tolist() == [info["height"], info["width"]]
    # Image 139 has 3 drawn objects and 1 crowd box: the crowd box is dropped; 724 has none.
    if split == "train":
        assert len(ds[ds.ids.index(139)][1]["boxes"]) == 3
        assert ds[ds.ids.index(724)][1]["boxes"].shape == (0, 4)


def test_degenerate_crowd_and_out_of_image_boxes_like_the_original(tiny, tmp_path):
    data = copy.deepcopy(tiny["gt"]["train"])
    img = next(i for i in data["images"] if i["id"] == 785)
    W, H = img["width"], img["height"]
    boxes = [
        ([10, 10, 0, 5], None, False),  # zero width → dropped
        ([10, 10, 5, -3], None, False),  # negative height → dropped
        ([W + 5, 10, 10, 10], None, False),  # right of the image: clamped to x1 = x2 = W → dropped
        ([-10, -10, 30, 30], [0, 0, 20, 20], False),  # clamped at the top-left
        ([W - 5, H - 5, 20, 20], [W - 5, H - 5, W, H], False),  # clamped at the bottom-right
        ([1.5, 2.25, 0.5, 0.25], [1.5, 2.25, 2.0, 2.5], False),  # tiny but positive → kept
        ([5, 5, 20, 20], None, True),  # crowd → dropped
        ([3, 4, 5, 6], [3, 4, 8, 10], "absent"),  # no iscrowd key → kept
    ]
    data["annotations"] = []
    for k, (bbox, _, crowd) in enumerate(boxes):
        ann = {"id": 500 + k, "image_id": 785, "category_id": 7, "bbox": bbox, "area": 1.0}
        if crowd != "absent":
            ann["iscrowd"] = int(crowd)
        data["annotations"].append(ann)
    ann_file = write_json(tmp_path / "degenerate.json", data)
    ds = CocoDetection(img_folder=tiny["image_dirs"]["train"], ann_file=ann_file)
    _, target = ds[ds.ids.index(785)]
    assert target["boxes"].tolist() == [kept for _, kept, _ in boxes if kept is not None]
    assert target["labels"].tolist() == [4] * 4  # category 7 is the 5th base id


def test_images_are_converted_to_rgb(tiny):
    ds = CocoDetection(img_folder=tiny["image_dirs"]["val"], ann_file=tiny["ann_files"]["val_basetarget"])
    folder = tiny["image_dirs"]["val"]

    def raw(image_id):
        return Image.open(folder / f"{image_id:012d}.png")

    gray_raw = np.asarray(raw(252219))
    gray = np.asarray(ds[ds.ids.index(252219)][0])
    assert gray.shape == (*gray_raw.shape, 3)
    for c in range(3):
        np.testing.assert_array_equal(gray[..., c], gray_raw)

    rgba_raw = np.asarray(raw(37777))
    assert rgba_raw.shape[-1] == 4 and len(np.unique(rgba_raw[..., 3])) > 2
    np.testing.assert_array_equal(np.asarray(ds[ds.ids.index(37777)][0]), rgba_raw[..., :3])

    pal_img = raw(87038)
    palette = np.array(pal_img.getpalette()[: 3 * 256]).reshape(-1, 3)
    expected = palette[np.asarray(pal_img)]
    np.testing.assert_array_equal(np.asarray(ds[ds.ids.index(87038)][0]), expected)

    train = CocoDetection(img_folder=tiny["image_dirs"]["train"], ann_file=tiny["ann_files"]["train_base"])
    for image_id in (632, 776):  # grayscale and CMYK jpegs
        image = train[train.ids.index(image_id)][0]
        assert image.mode == "RGB"


def test_built_val_dataset_resizes_and_normalises(tiny):
    ds = build_dataset("val", coco_args(tiny["root"]))
    raw = CocoDetection(img_folder=tiny["image_dirs"]["val"], ann_file=tiny["ann_files"]["val_basetarget"])
    idx = ds.ids.index(397133)
    image, target = ds[idx]
    raw_image, raw_target = raw[idx]
    h, w = raw_target["size"].tolist()
    out_h, out_w = val_resize_hw(h, w)
    assert tuple(image.shape) == (3, out_h, out_w)
    assert target["size"].tolist() == [out_h, out_w] and target["orig_size"].tolist() == [h, w]
    # Normalised cxcywh → xyxy in original pixels gives back the raw boxes.
    cx, cy, bw, bh = target["boxes"].unbind(-1)
    back = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1) * torch.tensor([w, h, w, h])
    torch.testing.assert_close(back, raw_target["boxes"], rtol=0, atol=1e-3)
    assert target["labels"].tolist() == raw_target["labels"].tolist()


def test_backbone_selects_normalisation(tiny):
    clip_img, _ = build_dataset("val", coco_args(tiny["root"], backbone="clip_RN50x4"))[0]
    in_img, _ = build_dataset("val", coco_args(tiny["root"], backbone="resnet50"))[0]
    clip01 = clip_img * torch.tensor(CLIP_STD)[:, None, None] + torch.tensor(CLIP_MEAN)[:, None, None]
    in01 = in_img * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
    torch.testing.assert_close(clip01, in01, rtol=0, atol=1e-5)
    assert not torch.allclose(clip_img, in_img)


def test_coco_api_from_dataset(tiny):
    ds = build_dataset("val", coco_args(tiny["root"]))
    coco = get_coco_api_from_dataset(torch.utils.data.Subset(torch.utils.data.Subset(ds, [0, 1]), [0]))
    assert coco is ds.coco
    assert sorted(coco.getCatIds()) == sorted(c["id"] for c in tiny["gt"]["val"]["categories"])
    assert len(coco.getAnnIds()) == len(tiny["gt"]["val"]["annotations"])
    with pytest.raises(TypeError, match="TensorDataset"):
        get_coco_api_from_dataset(torch.utils.data.TensorDataset(torch.zeros(2)))


# ----------------------------------------------------------------------------- which json is read


SPEC_TRAIN_FILES = {
    "": "instances_train2017_base.json",
    "ori": "instances_train2017_base.json",
    "RN50base": "instances_train2017_base_RN50relabel.json",
    "RN50x4base_prev": "instances_train2017_base_RN50x4relabel_pre.json",
    "RN50x4base": "instances_train2017_base_RN50x4relabel.json",
    "RN50x4base_coconames": "instances_train2017_base_RN50x4relabel_coconames.json",
}


def test_label_version_selects_training_json(tiny_rw):
    root, gt = tiny_rw["root"], tiny_rw["gt"]["train"]
    names = sorted(set(SPEC_TRAIN_FILES.values()) | {"instances_train2017.json"})
    # Each file lists a different number of images, so the dataset's length tells which was read.
    n_images = {name: k + 1 for k, name in enumerate(names)}
    for name, n in n_images.items():
        data = copy.deepcopy(gt)
        keep = {img["id"] for img in data["images"][:n]}
        data["images"] = data["images"][:n]
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
        write_json(root / "annotations" / name, data)
    for version, name in SPEC_TRAIN_FILES.items():
        ds = build_dataset("train", coco_args(root, label_version=version))
        assert ds.ann_file.name == name and len(ds) == n_images[name]
        assert ds.img_folder == root / "train2017"
    ds = build_dataset("train", coco_args(root, ovd=False, label_version="RN50base"))
    assert ds.ann_file.name == "instances_train2017.json" and len(ds) == n_images["instances_train2017.json"]


def test_val_json_selection(tiny_rw):
    root = tiny_rw["root"]
    val = tiny_rw["gt"]["val"]
    target_only = copy.deepcopy(val)
    target_only["images"] = target_only["images"][:1]
    write_json(root / "annotations" / "instances_val2017_target.json", target_only)
    write_json(root / "annotations" / "instances_val2017.json", val)
    for kwargs, name in [
        ({}, "instances_val2017_basetarget.json"),
        ({"label_version": "RN50base"}, "instances_val2017_basetarget.json"),
        ({"eval_target": True}, "instances_val2017_target.json"),
        ({"ovd": False}, "instances_val2017.json"),
    ]:
        ds = build_dataset("val", coco_args(root, **kwargs))
        assert ds.ann_file.name == name and ds.img_folder == root / "val2017"
    assert len(build_dataset("val", coco_args(root, eval_target=True))) == 1


# ----------------------------------------------------------------------------- error paths


def test_missing_json_names_path_and_label_version(tiny):
    with pytest.raises(FileNotFoundError) as e:
        build_dataset("train", coco_args(tiny["root"], label_version="RN50x4base_prev"))
    msg = str(e.value)
    assert "instances_train2017_base_RN50x4relabel_pre.json" in msg and "RN50x4base_prev" in msg
    with pytest.raises(FileNotFoundError, match="instances_val2017_target.json.*eval_target"):
        build_dataset("val", coco_args(tiny["root"], eval_target=True))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_dataset("val", coco_args(tiny["root"] / "nowhere"))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CocoDetection(img_folder=tiny["root"], ann_file=tiny["root"] / "missing.json")


def test_bad_choices_are_rejected(tiny):
    with pytest.raises(ValueError, match="custom"):
        build_dataset("val", coco_args(tiny["root"], label_version="custom"))
    with pytest.raises(ValueError, match="coco_panoptic"):
        build_dataset("val", coco_args(tiny["root"], dataset_file="coco_panoptic"))
    with pytest.raises(ValueError, match="test"):
        build_dataset("test", coco_args(tiny["root"]))


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_json_without_required_key(tiny, tmp_path, key):
    data = copy.deepcopy(tiny["gt"]["val"])
    del data[key]
    ann_file = write_json(tmp_path / "broken.json", data)
    with pytest.raises(ValueError) as e:
        CocoDetection(img_folder=tiny["image_dirs"]["val"], ann_file=ann_file)
    assert str(ann_file) in str(e.value) and repr(key) in str(e.value)


def test_json_that_is_not_json(tiny, tmp_path):
    ann_file = tmp_path / "garbage.json"
    ann_file.write_text("{not json")
    with pytest.raises(ValueError, match="garbage.json"):
        CocoDetection(img_folder=tiny["image_dirs"]["val"], ann_file=ann_file)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_box_is_reported_at_construction(tiny, tmp_path, bad):
    data = copy.deepcopy(tiny["gt"]["val"])
    ann = data["annotations"][1]
    ann["bbox"][2] = bad
    ann_file = write_json(tmp_path / "nonfinite.json", data)  # json writes NaN / Infinity
    with pytest.raises(ValueError) as e:
        CocoDetection(img_folder=tiny["image_dirs"]["val"], ann_file=ann_file)
    msg = str(e.value)
    assert str(ann_file) in msg and f"annotation id {ann['id']}" in msg and "non-finite" in msg


def test_malformed_box_is_reported(tiny, tmp_path):
    data = copy.deepcopy(tiny["gt"]["val"])
    ann = data["annotations"][0]
    ann["bbox"] = [1, 2, 3]
    ann_file = write_json(tmp_path / "short.json", data)
    with pytest.raises(ValueError, match=f"annotation id {ann['id']}.*4 numbers"):
        CocoDetection(img_folder=tiny["image_dirs"]["val"], ann_file=ann_file)


def test_unknown_category_is_reported_at_construction(tiny, tmp_path):
    data = copy.deepcopy(tiny["gt"]["train"])
    ann = data["annotations"][-1]
    ann["category_id"] = 5  # airplane: a novel category, not declared by the base-only train json
    ann_file = write_json(tmp_path / "unknown_cat.json", data)
    with pytest.raises(ValueError) as e:
        CocoDetection(img_folder=tiny["image_dirs"]["train"], ann_file=ann_file)
    msg = str(e.value)
    assert str(ann_file) in msg and f"annotation id {ann['id']}" in msg and "category_id 5" in msg


def test_missing_image_file(tiny_rw):
    ds = build_dataset("train", coco_args(tiny_rw["root"]))
    path = tiny_rw["image_dirs"]["train"] / "000000000632.jpg"
    path.unlink()
    # a file gone after the start is named when its item is read, and the others still load
    with pytest.raises(FileNotFoundError) as e:
        ds[ds.ids.index(632)]
    assert str(path) in str(e.value) and "image id 632" in str(e.value)
    ds[ds.ids.index(139)]
    # a file missing when the dataset is opened stops the run before any training, naming it
    missing = r"1 listed image file\(s\) not found: .*000000000632.jpg \(image id 632\)"
    with pytest.raises(FileNotFoundError, match=missing):
        build_dataset("train", coco_args(tiny_rw["root"]))


def test_training_json_without_boxes_is_refused_and_boxes_without_area_counted(tiny_rw, capsys):
    root = tiny_rw["root"]
    ann = root / "annotations" / "instances_train2017_base.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["bbox"][2] = 0  # no width: ignored, and counted
    write_json(ann, data)
    build_dataset("train", coco_args(root))
    warning = f"annotation file {ann}: 1 box(es) with zero or negative width or height are ignored"
    assert warning in capsys.readouterr().out
    data["annotations"] = [a for a in data["annotations"] if a.get("iscrowd", 0)]
    write_json(ann, data)
    with pytest.raises(ValueError, match="no box to train on"):
        build_dataset("train", coco_args(root))
    build_dataset("val", coco_args(root))  # a val json may hold images without boxes


def test_unreadable_image_file(tiny_rw):
    ds = build_dataset("val", coco_args(tiny_rw["root"]))
    path = tiny_rw["image_dirs"]["val"] / "000000037777.png"
    path.write_bytes(b"this is not a png")
    with pytest.raises(OSError) as e:
        ds[ds.ids.index(37777)]
    assert str(path) in str(e.value) and "image id 37777" in str(e.value)


# ----------------------------------------------------------------------------- LVIS


def make_tiny_lvis(tiny, root: Path) -> tuple[Path, dict]:
    """An LVIS-style json over the tiny images (both folders) with categories 1, 3, 7 listed out of order."""
    categories = [
        {"id": 3, "name": "traffic_light"},
        {"id": 1, "name": "aerosol_can"},
        {"id": 7, "name": "bow_(weapon)"},
    ]
    remap = {}
    images, annotations = [], []
    for split in ("train", "val"):
        gt = tiny["gt"][split]
        for img in gt["images"]:
            images.append({k: img[k] for k in ("id", "height", "width", "coco_url")})
        for a in gt["annotations"]:
            if a["iscrowd"] or a["image_id"] == 397133:  # 397133 (the largest id) left without boxes
                continue
            cat = remap.setdefault(a["category_id"], [1, 3][len(remap) % 2])
            annotations.append({k: a[k] for k in ("id", "image_id", "bbox", "area")} | {"category_id": cat})
    data = {"images": images, "annotations": annotations, "categories": categories}
    return write_json(root / "lvis_v1_train_norare.json", data), data


def test_lvis_categories_labels_and_image_paths(tiny, tmp_path):
    ann_file, data = make_tiny_lvis(tiny, tmp_path)
    raw = LvisDetection(img_folder=tiny["root"], ann_file=ann_file)
    mapped = LvisDetection(img_folder=tiny["root"], ann_file=ann_file, label_map=True)
    assert raw.category_list == ["aerosol can", "traffic light", "bow (weapon)"]
    assert raw.label2catid == {0: 1, 1: 3, 2: 7}
    for idx, image_id in enumerate(raw.ids):
        anns = [a for a in data["annotations"] if a["image_id"] == image_id]
        if not anns:
            continue
        image, target = raw[idx]
        info = next(i for i in data["images"] if i["id"] == image_id)
        assert image.size == (info["width"], info["height"]) and image.mode == "RGB"
        assert target["image_id"].tolist() == [image_id]
        assert target["labels"].tolist() == [a["category_id"] for a in anns]
        assert mapped[idx][1]["labels"].tolist() == [{1: 0, 3: 1, 7: 2}[a["category_id"]] for a in anns]
        assert target["area"].tolist() == [a["area"] for a in anns]
        assert target["boxes"].tolist() == [expected_xyxy(a, info["width"], info["height"]) for a in anns]


def test_lvis_skips_images_without_boxes(tiny, tmp_path):
    ann_file, _ = make_tiny_lvis(tiny, tmp_path)
    ds = LvisDetection(img_folder=tiny["root"], ann_file=ann_file)
    empty_train = ds.ids.index(724)
    assert ds[empty_train][1]["image_id"].tolist() == [ds.ids[empty_train + 1]]
    assert ds.ids[-1] == 397133  # no boxes: wraps around to index 0
    assert ds[len(ds) - 1][1]["image_id"].tolist() == [ds.ids[0]]


def test_lvis_without_any_box_raises_instead_of_recursing(tiny, tmp_path):
    _, data = make_tiny_lvis(tiny, tmp_path)
    data["annotations"] = []
    ann_file = write_json(tmp_path / "empty.json", data)
    ds = LvisDetection(img_folder=tiny["root"], ann_file=ann_file)
    with pytest.raises(RuntimeError, match="no image"):
        ds[3]


def test_lvis_build_file_selection_and_missing_file(tiny, tmp_path):
    ann_file, data = make_tiny_lvis(tiny, tmp_path)
    root = tmp_path
    for name in ("lvis_v1_train_norare_relabel.json", "lvis_v1_val.json", "lvis_v1_val_norare.json"):
        write_json(root / name, data)
    for split in ("train2017", "val2017"):
        shutil.copytree(tiny["root"] / split, root / split)
    base = dict(dataset_file="lvis", lvis_path=str(root), backbone="clip_RN50")
    cases = [
        ("train", {}, "lvis_v1_train_norare.json"),
        ("train", {"label_version": "RN50x4base"}, "lvis_v1_train_norare_relabel.json"),
        ("val", {}, "lvis_v1_val.json"),
        ("val", {"no_target_eval": True}, "lvis_v1_val_norare.json"),
    ]
    for image_set, kwargs, name in cases:
        ds = build_dataset(image_set, parsed_args(**(base | kwargs)))
        assert isinstance(ds, LvisDetection) and ds.ann_file.name == name
    image, target = ds[0]
    assert image.ndim == 3 and target["boxes"].max() <= 1.0
    (root / "lvis_v1_val.json").unlink()
    with pytest.raises(FileNotFoundError, match="lvis_v1_val.json"):
        build_dataset("val", parsed_args(**base))


# ----------------------------------------------------------------------------- repeat-factor sampling


def test_repeat_factors_hand_computed():
    # 4 images; category 1 in 3 images, 2 in 1 image, 3 in none. t = 0.5.
    # f(1) = 3.001 / 4 → sqrt(0.5 / 0.75025) < 1 → r = 1; f(2) = 1.001 / 4 → r = sqrt(2 / 1.001) = 1.4135070
    factors = repeat_factors([[1, 1, 2], [1], [], [1]], [1, 2, 3], 0.5)
    assert factors[0] == pytest.approx(math.sqrt(2 / 1.001), abs=1e-12)
    assert factors[0] == pytest.approx(1.4135070, abs=1e-7)
    assert abs(factors[0] - math.sqrt(2)) > 5e-4  # the counts start at 1e-3, not 0
    assert factors[1:] == [1.0, 1.0, 1.0]


def test_lvis_repeat_factors_use_the_originals_effective_threshold(tiny, tmp_path):
    ann_file, data = make_tiny_lvis(tiny, tmp_path)
    data["annotations"] = [
        {"id": 1, "image_id": 139, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25.0},
        {"id": 2, "image_id": 139, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 25.0},
        {"id": 3, "image_id": 285, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25.0},
        {"id": 4, "image_id": 285, "category_id": 1, "bbox": [2, 2, 5, 5], "area": 25.0},
    ]
    write_json(tmp_path / "lvis_v1_train_norare.json", data)
    for split in ("train2017", "val2017"):
        (tmp_path / split).symlink_to(tiny["root"] / split)
    n = len(data["images"])  # 10
    args = parsed_args("--dataset_file", "lvis", "--lvis_path", str(tmp_path), "--repeat_factor_sampling")
    ds = build_dataset("train", args)
    # t is 1 (the original passes `repeat_threshold and image_set == 'train'`, i.e. True):
    # r(1) = sqrt(1 / (2.001 / 10)) = 2.2355..., r(3) = sqrt(1 / (1.001 / 10)) = 3.1607...
    expected = {139: math.sqrt(n / 1.001), 285: math.sqrt(n / 2.001)}
    assert ds.rep_factors == pytest.approx([expected.get(i, 1.0) for i in ds.ids], abs=1e-12)
    assert expected[139] == pytest.approx(3.16070, abs=1e-5) and expected[285] == pytest.approx(
        2.23551, abs=1e-5
    )
    direct = LvisDetection(
        img_folder=tmp_path,
        ann_file=tmp_path / "lvis_v1_train_norare.json",
        repeat_factor_sampling=True,
        repeat_threshold=0.5,
    )
    assert direct.rep_factors[direct.ids.index(139)] == pytest.approx(math.sqrt(0.5 * n / 1.001), abs=1e-12)
    write_json(tmp_path / "lvis_v1_val.json", data)
    assert (
        build_dataset("val", args).rep_factors is None
    )  # repeat-factor sampling is for the train split only


def test_distributed_weighted_sampler_pads_and_strides_by_rank():
    # N = 5, 2 ranks: padded indices 0,1,2,3,4,0; rank 0 gets 0,2,4 and rank 1 gets 1,3,0.
    weights = [1.0, 0.0, 0.0, 0.0, 0.0]
    for rank in (0, 1):
        sampler = DistributedWeightedSampler(weights=weights, num_replicas=2, rank=rank)
        assert len(sampler) == 3
        assert list(sampler) == [0, 0, 0]  # only index 0 has weight, and both ranks hold it
    weights = [0.0, 1.0, 0.0, 1.0, 0.0]
    assert set(DistributedWeightedSampler(weights=weights, num_replicas=2, rank=1)) <= {1, 3}
    with pytest.raises(RuntimeError):
        list(DistributedWeightedSampler(weights=weights, num_replicas=2, rank=0))  # all of 0,2,4 weigh 0


def test_distributed_weighted_sampler_is_deterministic_per_epoch():
    weights = [1.0 + (i % 3) for i in range(50)]
    a = DistributedWeightedSampler(weights=weights, num_replicas=3, rank=2)
    b = DistributedWeightedSampler(weights=weights, num_replicas=3, rank=2)
    first = list(a)
    torch.manual_seed(123)  # the global RNG plays no part
    assert list(a) == first == list(b)
    # 50 indices padded to 51 with index 0; rank 2 holds 2, 5, ..., 47 and the pad 0: 17 draws.
    subset = list(range(2, 50, 3)) + [0]
    assert len(first) == 17 and set(first) <= set(subset)
    # The generator is seeded with the epoch (0): multinomial with replacement over the rank's weights.
    g = torch.Generator().manual_seed(0)
    expected = torch.tensor(subset)[
        torch.multinomial(torch.tensor([weights[i] for i in subset]), 17, True, generator=g)
    ]
    assert first == expected.tolist()
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)


def test_distributed_weighted_sampler_needs_rank_without_process_group():
    with pytest.raises(RuntimeError, match="num_replicas and rank"):
        DistributedWeightedSampler(weights=[1.0])
    with pytest.raises(ValueError, match="rank 2"):
        DistributedWeightedSampler(weights=[1.0], num_replicas=2, rank=2)


def test_train_dataset_through_loader_and_collate(tiny):
    from util.nested_tensor import collate_fn

    ds = build_dataset("train", coco_args(tiny["root"], label_version="RN50base"))
    ds = pickle.loads(pickle.dumps(ds))  # DataLoader workers under 'spawn' pickle the dataset
    random.seed(0)
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=False, collate_fn=collate_fn)
    n_boxes = []
    for samples, targets in loader:
        for image_mask, target in zip(samples.mask, targets, strict=True):
            h, w = target["size"].tolist()
            # Short side one of the train scales, unless the 1333 limit on the long side set it.
            assert (
                min(h, w) in {480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800}
                or 1300 < max(h, w) <= 1333
            )
            assert not image_mask[:h, :w].any() and image_mask.sum() == image_mask.numel() - h * w
            boxes = target["boxes"]
            assert ((boxes >= 0) & (boxes <= 1)).all()
            n_boxes.append(len(boxes))
    assert len(n_boxes) == 6 and n_boxes[ds.ids.index(724)] == 0
