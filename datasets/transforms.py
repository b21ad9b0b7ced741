"""Joint image + target transforms of the original CORA data pipeline (SPEC §2.4).

Images are PIL images until `ToTensor`. A target is a dict (or None) holding at least
`boxes`: float32 `[N,4]` **xyxy in absolute pixels** of the current image, `labels`: int64 `[N]`,
and `size`: int64 `[2]` = current `[h, w]`. Geometric transforms update `boxes` and `size` (a crop
also sets `area`); `Normalize` is the last step and turns `boxes` into **cxcywh normalised** by the
final image width/height.

Randomness comes from Python's `random` module (flip, resize scale, branch choice, crop size) and
from torch's global RNG (crop offset, via `torchvision.transforms.RandomCrop.get_params`), in the
same order as the original, so seeding both reproduces its augmentations.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image

from util.box_ops import box_xyxy_to_cxcywh
from util.image import to_rgb

Target = dict[str, Any]
JointTransform = Callable[[Any, Any], tuple[Any, Any]]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

TRAIN_SCALES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
TRAIN_CROP_RESIZE = (400, 500, 600)
TRAIN_CROP_MIN, TRAIN_CROP_MAX = 384, 600
VAL_SIZE = 800
MAX_SIZE = 1333


def resize_output_hw(height: int, width: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """Output `(h, w)` of the original's resize to short side `size`, long side at most `max_size`.

    Reproduces the original's rounding exactly: a size limited by `max_size` is
    `int(round(...))` (Python's round-half-to-even), the long side is truncated with `int(...)`,
    and an image whose short side already equals the target keeps its size.
    """
    if max_size is not None:
        min_original = float(min(width, height))
        max_original = float(max(width, height))
        if max_original / min_original * size > max_size:
            size = int(round(max_size * min_original / max_original))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def val_resize_hw(height: int, width: int) -> tuple[int, int]:
    """Output `(h, w)` of the val transform's resize (short side 800, long side at most 1333)."""
    return resize_output_hw(height, width, VAL_SIZE, MAX_SIZE)


def hflip(image: Image.Image, target: Target | None) -> tuple[Image.Image, Target | None]:
    """Mirror the image left-right; xyxy boxes become `[w - x2, y1, w - x1, y2]`."""
    flipped = F.hflip(image)
    if target is None:
        return flipped, None
    width, _ = image.size
    target = target.copy()
    if "boxes" in target:
        boxes = target["boxes"]
        target["boxes"] = boxes[:, [2, 1, 0, 3]] * torch.as_tensor([-1, 1, -1, 1]) + torch.as_tensor(
            [width, 0, width, 0]
        )
    return flipped, target


def resize(
    image: Image.Image, target: Target | None, size: int, max_size: int | None = None
) -> tuple[Image.Image, Target | None]:
    """Bilinear resize to short side `size` (see `resize_output_hw`); boxes and `area` scale with it."""
    width, height = image.size
    out_h, out_w = resize_output_hw(height, width, size, max_size)
    resized = F.resize(image, [out_h, out_w])
    if target is None:
        return resized, None
    ratio_w = float(resized.size[0]) / float(width)
    ratio_h = float(resized.size[1]) / float(height)
    target = target.copy()
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.as_tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    if "area" in target:
        target["area"] = target["area"] * (ratio_w * ratio_h)
    target["size"] = torch.tensor([out_h, out_w])
    return resized, target


def crop(
    image: Image.Image, target: Target | None, region: tuple[int, int, int, int]
) -> tuple[Image.Image, Target | None]:
    """Crop `region = (top, left, height, width)`.

    Boxes are shifted into the crop and clipped to it, `area` is recomputed from the clipped boxes,
    and boxes (with their `labels` and `area`) whose clipped width or height is not positive are
    removed. Other per-box fields are left as they are, as in the original.
    """
    top, left, height, width = region
    cropped = F.crop(image, top, left, height, width)
    if target is None:
        return cropped, None
    target = target.copy()
    target["size"] = torch.tensor([height, width])
    if "boxes" in target:
        limit = torch.as_tensor([width, height], dtype=torch.float32)
        corners = target["boxes"] - torch.as_tensor([left, top, left, top])
        corners = torch.min(corners.reshape(-1, 2, 2), limit).clamp(min=0)
        target["area"] = (corners[:, 1, :] - corners[:, 0, :]).prod(dim=1)
        target["boxes"] = corners.reshape(-1, 4)
        keep = torch.all(corners[:, 1, :] > corners[:, 0, :], dim=1)
        for field in ("labels", "area", "boxes"):
            if field in target:
                target[field] = target[field][keep]
    return cropped, target


class RandomHorizontalFlip:
    """Flip with probability `p` (decided by `random.random() < p`)."""

    def __init__(self, *, p: float = 0.5):
        self.p = p

    def __call__(self, image: Image.Image, target: Target | None) -> tuple[Image.Image, Target | None]:
        if random.random() < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomResize:
    """Resize to a short side drawn with `random.choice(sizes)`, long side at most `max_size`."""

    def __init__(self, *, sizes: Sequence[int], max_size: int | None = None):
        if len(sizes) == 0:
            raise ValueError("RandomResize: sizes must not be empty")
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image: Image.Image, target: Target | None = None) -> tuple[Image.Image, Target | None]:
        size = random.choice(self.sizes)
        return resize(image, target, size, self.max_size)

    def __repr__(self) -> str:
        return f"RandomResize(sizes={self.sizes}, max_size={self.max_size})"


class RandomSizeCrop:
    """Crop a random `w x h` window, `w ~ randint(min_size, min(img_w, max_size))` then the same for h.

    The offset comes from `torchvision.transforms.RandomCrop.get_params` (torch RNG). The image must
    be at least `min_size` on each side (always true after the preceding resize to >= 400).
    """

    def __init__(self, *, min_size: int, max_size: int):
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image: Image.Image, target: Target | None) -> tuple[Image.Image, Target | None]:
        width = random.randint(self.min_size, min(image.width, self.max_size))
        height = random.randint(self.min_size, min(image.height, self.max_size))
        region = T.RandomCrop.get_params(image, [height, width])
        return crop(image, target, region)

    def __repr__(self) -> str:
        return f"RandomSizeCrop(min_size={self.min_size}, max_size={self.max_size})"


class RandomSelect:
    """Apply `transforms1` with probability `p` (`random.random() < p`), else `transforms2`."""

    def __init__(self, *, transforms1: JointTransform, transforms2: JointTransform, p: float = 0.5):
        self.transforms1 = transforms1
        self.transforms2 = transforms2
        self.p = p

    def __call__(self, image: Any, target: Target | None) -> tuple[Any, Target | None]:
        if random.random() < self.p:
            return self.transforms1(image, target)
        return self.transforms2(image, target)

    def __repr__(self) -> str:
        return f"RandomSelect(p={self.p},\n  {self.transforms1!r},\n  {self.transforms2!r})"


class ToRGB:
    """`util.image.to_rgb` (grayscale replicated, 16-bit grayscale scaled, alpha dropped, palette/CMYK converted)."""

    def __call__(self, image: Image.Image, target: Target | None) -> tuple[Image.Image, Target | None]:
        return to_rgb(image), target

    def __repr__(self) -> str:
        return "ToRGB()"


class ToTensor:
    """PIL image → float32 `[C,H,W]` tensor in [0, 1]."""

    def __call__(self, image: Image.Image, target: Target | None) -> tuple[torch.Tensor, Target | None]:
        return F.to_tensor(image), target

    def __repr__(self) -> str:
        return "ToTensor()"


class Normalize:
    """`(x - mean) / std` per channel; boxes xyxy absolute → cxcywh divided by the image's `(w, h)`."""

    def __init__(self, *, mean: Sequence[float], std: Sequence[float]):
        self.mean = list(mean)
        self.std = list(std)

    def __call__(
        self, image: torch.Tensor, target: Target | None = None
    ) -> tuple[torch.Tensor, Target | None]:
        image = F.normalize(image, mean=self.mean, std=self.std)
        if target is None:
            return image, None
        target = target.copy()
        height, width = image.shape[-2:]
        if "boxes" in target:
            boxes = box_xyxy_to_cxcywh(target["boxes"])
            target["boxes"] = boxes / torch.tensor([width, height, width, height], dtype=torch.float32)
        return image, target

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class Compose:
    """Apply joint transforms in order."""

    def __init__(self, *, transforms: Sequence[JointTransform]):
        self.transforms = list(transforms)

    def __call__(self, image: Any, target: Target | None) -> tuple[Any, Target | None]:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}" for t in self.transforms)
        return f"Compose({inner}\n)"


def make_coco_transforms(image_set: str, clip_normalisation: bool, *, image_scale: float = 1.0) -> Compose:
    """The original's train / val pipelines.

    train: flip(0.5) → [0.5: resize(scales, max 1333) | 0.5: resize([400,500,600]) → RandomSizeCrop(384, 600)
    → resize(scales, max 1333)] → normalise. val: resize(800, max 1333) → normalise.
    `clip_normalisation` selects CLIP's mean/std instead of ImageNet's. `image_scale` multiplies every
    size above (rounded; 1 = the original's): small images, e.g. the toy world's 256 px scenes
    (`--image_scale 0.32`), are then not blown up to 800 px.
    """
    if not image_scale > 0:
        raise ValueError(f"image_scale {image_scale}: must be positive")

    def sized(*sizes: int) -> tuple[int, ...]:
        return tuple(sizes) if image_scale == 1.0 else tuple(max(1, round(s * image_scale)) for s in sizes)

    train_scales, max_size = sized(*TRAIN_SCALES), sized(MAX_SIZE)[0]
    mean, std = (CLIP_MEAN, CLIP_STD) if clip_normalisation else (IMAGENET_MEAN, IMAGENET_STD)
    normalize = Compose(transforms=[ToRGB(), ToTensor(), Normalize(mean=mean, std=std)])
    if image_set == "train":
        crop_min, crop_max = sized(TRAIN_CROP_MIN, TRAIN_CROP_MAX)
        return Compose(
            transforms=[
                RandomHorizontalFlip(p=0.5),
                RandomSelect(
                    transforms1=RandomResize(sizes=train_scales, max_size=max_size),
                    transforms2=Compose(
                        transforms=[
                            RandomResize(sizes=sized(*TRAIN_CROP_RESIZE)),
                            RandomSizeCrop(min_size=crop_min, max_size=crop_max),
                            RandomResize(sizes=train_scales, max_size=max_size),
                        ]
                    ),
                    p=0.5,
                ),
                normalize,
            ]
        )
    if image_set == "val":
        return Compose(transforms=[RandomResize(sizes=list(sized(VAL_SIZE)), max_size=max_size), normalize])
    raise ValueError(f"make_coco_transforms: unknown image_set {image_set!r}, expected 'train' or 'val'")
