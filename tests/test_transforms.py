"""datasets/transforms.py against the original's golden outputs and hand-computed cases."""

from __future__ import annotations

import hashlib
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

import datasets.transforms as T
from tests import golden


def _target(boxes, labels=None, size_hw=None) -> dict:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = torch.arange(len(boxes)) if labels is None else torch.tensor(labels, dtype=torch.int64)
    target = {"boxes": boxes, "labels": labels}
    if size_hw is not None:
        target["size"] = torch.tensor(size_hw)
    return target


# ----------------------------------------------------------------------------- golden: val transform


def test_val_resize_size_matches_original():
    """Every input size of the golden transforms.json (read here, not when the module is imported)."""
    for case in golden.load_json("transforms.json")["cases"]:
        h, w = case["orig_hw"]
        what = f"input {h}x{w}"
        assert T.val_resize_hw(h, w) == tuple(case["val_hw"]), what
        image = Image.new("RGB", (w, h), (10, 20, 30))
        out, target = T.make_coco_transforms("val", clip_normalisation=True)(
            image, _target([[0, 0, w, h]], size_hw=[h, w])
        )
        assert tuple(out.shape) == (3, *case["val_hw"]), what
        assert target["size"].tolist() == case["val_hw"], what
        # The whole-image box stays the whole image in normalised cxcywh.
        torch.testing.assert_close(target["boxes"], torch.tensor([[0.5, 0.5, 1.0, 1.0]]),
                                   msg=lambda m, what=what: f"{what}: {m}")


def test_val_resize_parameters_match_golden():
    g = golden.load_json("transforms.json")
    assert (T.VAL_SIZE, T.MAX_SIZE) == (g["val_resize"]["size"], g["val_resize"]["max_size"])


def _coffee_input() -> Image.Image:
    """scikit-image's 400x600 coffee.png (CC0), the input of the golden resize, shipped in assets/samples."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "samples", "coffee.png")
    with open(path, "rb") as f:
        assert hashlib.md5(f.read()).hexdigest() == "f24210802e8d0690e0c1c2302f907cc4", "not scikit-image's coffee.png"
    return Image.open(path).convert("RGB")


def test_val_resize_of_coffee_is_pixel_exact():
    g = golden.load_json("transforms.json")["coffee"]
    image = _coffee_input()
    assert [image.height, image.width] == g["orig_hw"]
    resized, _ = T.RandomResize(sizes=[T.VAL_SIZE], max_size=T.MAX_SIZE)(image, None)
    expected = np.asarray(Image.open(golden.path("val_transform_coffee.png")).convert("RGB"))
    actual = np.asarray(resized)
    assert actual.shape == expected.shape == (*g["val_hw"], 3)
    assert np.abs(actual.astype(int) - expected.astype(int)).max() == 0

    normalised, _ = T.make_coco_transforms("val", clip_normalisation=True)(image, None)
    assert normalised.double().sum().item() == pytest.approx(g["normalised_tensor_sum"], abs=1e-3)
    torch.testing.assert_close(
        normalised[:, 0, 0], torch.tensor(g["normalised_tensor_first_pixel"]), rtol=0, atol=1e-6
    )


def test_val_transform_normalisation_of_golden_coffee():
    # The golden resized image already has short side 800, so the val transform keeps its size and
    # only normalises: its sum and first pixel must be the original's.
    g = golden.load_json("transforms.json")["coffee"]
    image = Image.open(golden.path("val_transform_coffee.png"))
    out, _ = T.make_coco_transforms("val", clip_normalisation=True)(image, None)
    assert list(out.shape[1:]) == g["val_hw"]
    assert out.dtype == torch.float32
    assert out.double().sum().item() == pytest.approx(g["normalised_tensor_sum"], abs=1e-3)
    torch.testing.assert_close(
        out[:, 0, 0], torch.tensor(g["normalised_tensor_first_pixel"]), rtol=0, atol=1e-6
    )


def test_clip_mean_std_match_golden():
    g = golden.load_json("transforms.json")
    assert list(T.CLIP_MEAN) == g["clip_mean"]
    assert list(T.CLIP_STD) == g["clip_std"]


# ----------------------------------------------------------------------------- train pipeline


def test_train_pipeline_resize_calls_follow_original(monkeypatch):
    """Every train sample is either resize(s, 1333), or resize(c) → crop(384..600) → resize(s, 1333)."""
    g = golden.load_json("transforms.json")
    scales, choices = g["train_scales"], g["train_crop"]["resize_choices"]
    crop_min, crop_max = g["train_crop"]["crop_min"], g["train_crop"]["crop_max"]
    calls: list[tuple] = []
    real_resize, real_crop = T.resize, T.crop

    def spy_resize(image, target, size, max_size=None):
        calls.append(("resize", size, max_size))
        return real_resize(image, target, size, max_size)

    def spy_crop(image, target, region):
        calls.append(("crop", region[2], region[3], image.height, image.width))
        return real_crop(image, target, region)

    monkeypatch.setattr(T, "resize", spy_resize)
    monkeypatch.setattr(T, "crop", spy_crop)
    pipeline = T.make_coco_transforms("train", clip_normalisation=True)
    image = Image.new("RGB", (64, 48), (1, 2, 3))
    patterns = set()
    for seed in range(24):
        random.seed(seed)
        torch.manual_seed(seed)
        calls.clear()
        out, target = pipeline(image, _target([[8, 12, 40, 36]], size_hw=[48, 64]))
        assert calls[-1][0] == "resize" and calls[-1][1] in scales and calls[-1][2] == 1333
        if len(calls) == 1:
            patterns.add("resize")
        else:
            assert len(calls) == 3
            assert calls[0][0] == "resize" and calls[0][1] in choices and calls[0][2] is None
            _, crop_h, crop_w, img_h, img_w = calls[1]
            assert crop_min <= crop_w <= min(img_w, crop_max) and crop_min <= crop_h <= min(img_h, crop_max)
            patterns.add("crop")
        assert list(out.shape[1:]) == target["size"].tolist()
    assert patterns == {"resize", "crop"}


def test_random_size_crop_draws_width_then_height_then_torch_offset():
    image = Image.new("RGB", (700, 500))
    random.seed(7)
    torch.manual_seed(7)
    _, target = T.RandomSizeCrop(min_size=384, max_size=600)(image, _target([[0, 0, 700, 500]]))
    rng = random.Random(7)
    w = rng.randint(384, 600)  # min(700, 600)
    h = rng.randint(384, 500)  # min(500, 600)
    torch.manual_seed(7)
    top = torch.randint(0, 500 - h + 1, size=(1,)).item()
    left = torch.randint(0, 700 - w + 1, size=(1,)).item()
    assert target["size"].tolist() == [h, w]
    # The whole-image box is clipped to exactly the crop window.
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.0, 0.0, w, h]]))
    image2 = Image.fromarray(np.random.default_rng(0).integers(0, 256, (500, 700, 3), dtype=np.uint8))
    random.seed(7)
    torch.manual_seed(7)
    cropped, _ = T.RandomSizeCrop(min_size=384, max_size=600)(image2, None)
    np.testing.assert_array_equal(np.asarray(cropped), np.asarray(image2)[top : top + h, left : left + w])


# ----------------------------------------------------------------------------- hand-computed cases


def test_resize_output_hw_rules():
    # max_size limits: 1333 * 50 / 100 = 666.5 → round-half-to-even 666; long side 666 * 2 = 1332.
    assert T.resize_output_hw(50, 100, 800, 1333) == (666, 1332)
    # Long side truncated: 800 * 640 / 427 = 1199.06 → 1199.
    assert T.resize_output_hw(427, 640, 800, 1333) == (800, 1199)
    # Short side already 800 (and the long side within max_size): size kept.
    assert T.resize_output_hw(800, 1333, 800, 1333) == (800, 1333)
    # Without max_size only the short side counts.
    assert T.resize_output_hw(100, 3000, 400, None) == (400, 12000)
    # Portrait: width is the short side.
    assert T.resize_output_hw(640, 480, 512, 1333) == (682, 512)


def test_resize_scales_boxes_area_and_size():
    image = Image.new("RGB", (64, 48))
    target = _target([[8, 12, 40, 36]], size_hw=[48, 64])
    target["area"] = torch.tensor([768.0])
    out, t = T.resize(image, target, 800, 1333)
    # (48, 64) → (800, int(800 * 64 / 48) = 1066); ratios 1066/64 and 800/48.
    assert out.size == (1066, 800)
    assert t["size"].tolist() == [800, 1066]
    torch.testing.assert_close(t["boxes"], torch.tensor([[133.25, 200.0, 666.25, 600.0]]))
    torch.testing.assert_close(t["area"], torch.tensor([213200.0]))  # 768 * 1066 * 800 / (64 * 48)
    assert target["boxes"].tolist() == [[8, 12, 40, 36]], "input target must not be modified"


def test_hflip_boxes():
    image = Image.fromarray(np.array([[[1, 0, 0], [2, 0, 0], [3, 0, 0]]], dtype=np.uint8))  # 1 x 3
    flipped, t = T.hflip(image, _target([[0, 0, 1, 1], [1, 0, 3, 1]]))
    assert np.asarray(flipped)[0, :, 0].tolist() == [3, 2, 1]
    torch.testing.assert_close(t["boxes"], torch.tensor([[2.0, 0.0, 3.0, 1.0], [0.0, 0.0, 2.0, 1.0]]))

    image = Image.new("RGB", (100, 50))
    _, t = T.hflip(image, _target([[10, 20, 30, 40]]))
    torch.testing.assert_close(t["boxes"], torch.tensor([[70.0, 20.0, 90.0, 40.0]]))


def test_random_horizontal_flip_probability_extremes():
    image = Image.new("RGB", (100, 50))
    _, always = T.RandomHorizontalFlip(p=1.0)(image, _target([[10, 20, 30, 40]]))
    _, never = T.RandomHorizontalFlip(p=0.0)(image, _target([[10, 20, 30, 40]]))
    assert always["boxes"].tolist() == [[70, 20, 90, 40]]
    assert never["boxes"].tolist() == [[10, 20, 30, 40]]


def test_crop_shifts_clips_recomputes_area_and_removes_outside_boxes():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (100, 120), dtype=np.uint8))
    target = _target(
        [
            [0, 0, 30, 30],  # → [-20,-10,10,20] → clipped [0,0,10,20], area 200
            [100, 100, 120, 120],  # right of / below the crop → removed
            [25, 15, 200, 200],  # → [5,5,180,185] → clipped [5,5,60,50], area 2475
            [79, 20, 90, 30],  # x1 = 59 < 60 → [59,10,60,20] kept, area 10
            [80, 20, 90, 30],  # x1 = 60 → zero width after clipping → removed
        ],
        labels=[3, 4, 5, 6, 7],
        size_hw=[100, 120],
    )
    cropped, t = T.crop(image, target, (10, 20, 50, 60))  # top, left, height, width
    assert cropped.size == (60, 50)
    np.testing.assert_array_equal(np.asarray(cropped), np.asarray(image)[10:60, 20:80])
    torch.testing.assert_close(
        t["boxes"], torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 60.0, 50.0], [59.0, 10.0, 60.0, 20.0]])
    )
    assert t["labels"].tolist() == [3, 5, 6]
    torch.testing.assert_close(t["area"], torch.tensor([200.0, 2475.0, 10.0]))
    assert t["size"].tolist() == [50, 60]


def test_normalize_pixels_and_cxcywh_boxes():
    image = torch.full((3, 4, 8), 0.5)
    mean, std = [0.25, 0.5, 0.75], [0.5, 0.25, 0.125]
    out, t = T.Normalize(mean=mean, std=std)(image, _target([[0, 0, 2, 4], [2, 1, 6, 3]]))
    # (0.5 - 0.25) / 0.5 = 0.5, (0.5 - 0.5) / 0.25 = 0, (0.5 - 0.75) / 0.125 = -2
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([0.5, 0.0, -2.0]))
    # [0,0,2,4] in an 8 x 4 (w x h) image: cx 1/8, cy 2/4, w 2/8, h 4/4.
    torch.testing.assert_close(t["boxes"], torch.tensor([[0.125, 0.5, 0.25, 1.0], [0.5, 0.5, 0.5, 0.5]]))
    out_none, t_none = T.Normalize(mean=mean, std=std)(image, None)
    assert t_none is None and torch.equal(out_none, out)


def test_to_rgb_and_to_tensor():
    gray = Image.fromarray(np.array([[0, 255], [51, 102]], dtype=np.uint8), mode="L")
    rgb, _ = T.ToRGB()(gray, None)
    assert rgb.mode == "RGB"
    tensor, _ = T.ToTensor()(rgb, None)
    expected = torch.tensor([[0.0, 1.0], [0.2, 0.4]])
    for c in range(3):
        torch.testing.assert_close(tensor[c], expected)


def test_random_select_and_compose_order():
    def tag(name):
        return lambda img, tgt: (img + [name], tgt)

    select_first = T.RandomSelect(transforms1=tag("a"), transforms2=tag("b"), p=1.0)
    select_second = T.RandomSelect(transforms1=tag("a"), transforms2=tag("b"), p=0.0)
    pipeline = T.Compose(transforms=[tag("x"), select_first, select_second, tag("y")])
    assert pipeline([], None) == (["x", "a", "b", "y"], None)


def test_imagenet_normalisation_when_not_clip():
    image = Image.new("RGB", (800, 800), (255, 0, 128))
    out, _ = T.make_coco_transforms("val", clip_normalisation=False)(image, None)
    expected = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    torch.testing.assert_close(out[:, 0, 0], torch.tensor(expected))


def test_unknown_image_set():
    with pytest.raises(ValueError, match="test"):
        T.make_coco_transforms("test", clip_normalisation=True)
