"""Predictor: a CORA checkpoint applied to any images with any vocabulary, without argparse.

    from models.predictor import Predictor

    predictor = Predictor.from_checkpoint("checkpoints/cora_rn50.pth")
    [dets] = predictor.predict(["photo.jpg"], ["cat", "remote control"], score_threshold=0.3)
    dets.boxes   # float32 [K,4] xyxy, pixels of photo.jpg as displayed (EXIF orientation applied)
    dets.scores  # [K], descending;  dets.names: K class names;  dets.labels: indices into dets.vocabulary

Each image goes through the evaluation pipeline of `main.py --eval` exactly: RGB, bilinear resize to
shorter side 800 / longer side at most 1333 (`datasets.transforms`), CLIP mean/std, the model in
eval mode with the checkpoint's EMA weights, and `PostProcess` with the image's original size
(class-wise NMS when the checkpoint's run used `--use_nms`, top `max_detections`).

Batching: `batch_size` images are padded (bottom/right, zeros) to a common size and run together,
as the original's evaluation does with `--batch_size`. Padding changes the CNN features near the
border, so an image's detections depend slightly on the other images of its batch when sizes
differ. The default `batch_size=1` gives every image the numbers a batch of one gives
(`../shared/golden/eval_single_*.pth`), independent of what else is predicted.

`--target_class_factor` (the eval-time boost of novel classes in anchor pre-matching) is a property
of the COCO-OVD benchmark: it applies when the vocabulary is exactly the 65 COCO-OVD names (the
17 novel ones are boosted), or to classes named by `novel_indices` (LVIS: the rare ones); for any
other vocabulary it is 1.
"""
from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from datasets.coco_ovd import novel_indices_for
from datasets.transforms import CLIP_MEAN, CLIP_STD, MAX_SIZE, VAL_SIZE, Compose, Normalize, ToRGB, ToTensor, resize
from models import ModelConfig, build_model, load_detector_weights
from models.clip import has_clip_weights
from models.detector import CORA
from models.inference import detect
from models.postprocess import PostProcess
from models.prematch import NovelBoost, resolve_boost
from models.text_cache import TextEmbeddingDiskCache, default_cache_dir, fill_text_cache, text_tower_fingerprint
from util.checkpoint import CheckpointError, load_checkpoint, pick_weights
from util.device import resolve_device
from util.image import to_rgb
from util.nested_tensor import nested_tensor_from_tensor_list
from util.numerics import set_tf32

ImageInput = str | os.PathLike | Image.Image | np.ndarray
# The trunk maps a side of n pixels to ceil(n/2) and then halves it (floor) four times: n < 31 leaves
# layer4's stride-2 pooling an empty output.
MIN_SIDE = 31


@dataclass
class Detections:
    """The detections of one image, best first.

    boxes: float32 `[K,4]` **xyxy in pixels of the image as given** (after EXIF orientation; x to
    the right, y down, origin at the top-left corner of the top-left pixel), clipped to the image
    unless `predict(clip_boxes=False)`. scores: float32 `[K]`, descending, in (0, 1]. labels: int64
    `[K]`, indices into `vocabulary`; names: the K class names. image_size: `(height, width)`.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    names: list[str]
    image_size: tuple[int, int]
    vocabulary: tuple[str, ...]
    source: str | None = None
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def normalize_vocabulary(vocabulary: Sequence[str]) -> tuple[str, ...]:
    """Class names as the model gets them: whitespace stripped and runs of it collapsed to one space,
    empty entries dropped, duplicates removed keeping the first (case-insensitively, since CLIP's
    tokenizer lowercases: 'Cat' and 'cat' would be two classes with one embedding)."""
    if isinstance(vocabulary, (str, bytes)):
        raise TypeError(f"vocabulary: expected a list of class names, found the string {vocabulary!r}; "
                        f"split it first, e.g. {str(vocabulary).split(',')!r}")
    names: dict[str, str] = {}
    for i, name in enumerate(vocabulary):
        if not isinstance(name, str):
            raise TypeError(f"vocabulary[{i}]: expected a class name (str), found {type(name).__name__} {name!r}")
        name = re.sub(r"\s+", " ", name).strip()
        if name and name.casefold() not in names:
            names[name.casefold()] = name
    if not names:
        raise ValueError(f"vocabulary: no class names left after stripping whitespace and dropping empty entries "
                         f"(given {list(vocabulary)!r}); give at least one name, e.g. ['cat', 'remote control']")
    return tuple(names.values())


def _describe(image, index: int | None) -> str:
    where = f"images[{index}]" if index is not None else "image"
    return f"{where} ({image})" if isinstance(image, (str, os.PathLike)) else where


def _array_to_pil(array: np.ndarray, what: str) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"{what}: expected an array [H,W] (grayscale), [H,W,3] (RGB) or [H,W,4] (RGBA), "
                         f"found shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{what}: empty image, shape {array.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(f"{what}: a float array must hold finite values in [0, 1], found range "
                             f"[{np.nanmin(array)}, {np.nanmax(array)}]")
        array = np.round(array * 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"{what}: expected dtype uint8 (0..255), bool, or float in [0, 1], found {array.dtype}")
    return Image.fromarray(np.ascontiguousarray(array))


def load_rgb(image: ImageInput, *, index: int | None = None) -> Image.Image:
    """Any supported input as an RGB PIL image, EXIF orientation applied.

    Paths and PIL images of any mode (L, LA, P, RGBA, CMYK, 16-bit grayscale, ...) go through
    `util.image.to_rgb` (alpha is dropped, not composited; 16 bits are scaled to 8). Arrays are RGB(A)
    channel order (convert OpenCV's BGR first).
    """
    what = _describe(image, index)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if path.is_dir():
            raise IsADirectoryError(f"{what}: is a directory, expected an image file")
        if not path.is_file():
            raise FileNotFoundError(f"{what}: file not found")
        try:
            with Image.open(path) as opened:
                opened.load()
                return to_rgb(ImageOps.exif_transpose(opened), what=what)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{what}: cannot be read as an image ({type(e).__name__}: {e})") from e
    if isinstance(image, Image.Image):
        return to_rgb(ImageOps.exif_transpose(image), what=what)
    if isinstance(image, np.ndarray):
        return _array_to_pil(image, what)
    raise TypeError(f"{what}: expected a file path, a PIL image or a numpy array, found {type(image).__name__}")


class Predictor:
    """A CORA model in eval mode with the evaluation's preprocessing and post-processing.

    model: a built `CORA` with its weights loaded (use `from_checkpoint` to get one from a file).
    use_nms: class-wise NMS in `PostProcess` (the published configs pass `--use_nms`).
    target_class_factor: the novel-class boost, applied only to benchmark vocabularies (module doc).
    resize: the val resize (shorter side 800, longer at most 1333); False feeds images at their own
    size (how the golden single-image files were made; the model was trained at 480-800).
    image_scale: multiplies the val resize's sizes as `--image_scale` does in training (rounded; the toy
    world's 0.32: shorter side 256, longer at most 427); `from_checkpoint` reads the run's stored value.
    cache_dir / disk_cache: where text embeddings are kept between processes (default
    `models.text_cache.default_cache_dir()`); `disk_cache=False` keeps them in memory only.
    device: 'cuda', 'cpu', ...; default cuda when available, else cpu.
    precision: 'fp32' (default: the evaluation's numbers) or 'bf16' (opt-in, for the demos: the trunk, the
    transformer and the region head's matrix products in bfloat16 under autocast, on a CPU with native
    bf16 (AVX512-BF16 / AMX) or a GPU that has it; scores, boxes, pre-matching and region-text
    similarities stay fp32; detections differ slightly, `main.py --eval` never uses it).
    """

    PRECISIONS = ("fp32", "bf16")

    def __init__(self, model: CORA, *, use_nms: bool = True, target_class_factor: float = 1.0, resize: bool = True,
                 cache_dir: str | os.PathLike | None = None, disk_cache: bool = True,
                 device: str | torch.device | None = None, image_scale: float = 1.0, precision: str = "fp32"):
        if not image_scale > 0:
            raise ValueError(f"image_scale {image_scale}: must be positive")
        self.device = resolve_device(device)
        self.precision = check_precision(precision, self.device)
        self.image_scale = float(image_scale)
        self.use_nms = use_nms
        self.target_class_factor = float(target_class_factor)
        self.resize = resize
        # Fingerprinted on the CPU weights, before they move to the device.
        self.text_cache = (TextEmbeddingDiskCache(cache_dir or default_cache_dir(),
                                                  text_tower_fingerprint(model.classifier))
                           if disk_cache else None)
        set_tf32(False)  # parity numerics, process-wide: no TF32 matmuls / convolutions (util/numerics.py)
        self.model = model.to(self.device).eval()
        self._warned_cut: set[str] = set()
        self._to_tensor = Compose(transforms=[ToRGB(), ToTensor(), Normalize(mean=CLIP_MEAN, std=CLIP_STD)])

    @classmethod
    def from_checkpoint(cls, checkpoint_path: str | os.PathLike, *, clip_archive: str | os.PathLike | None = None,
                        region_prompt: str | os.PathLike | None = None, use_ema: bool = True,
                        device: str | torch.device | None = None, cache_dir: str | os.PathLike | None = None,
                        disk_cache: bool = True, resize: bool = True, use_nms: bool | None = None,
                        target_class_factor: float | None = None, image_scale: float | None = None,
                        precision: str = "fp32") -> Predictor:
        """Build the model a checkpoint describes and load its weights (`model_ema` when present and
        `use_ema`, else `model`; a bare state dict is accepted too).

        The architecture comes from the checkpoint's stored `args` (falling back to main.py's defaults)
        and the tensors' shapes. A published/full checkpoint holds every CLIP tensor, so no CLIP archive
        or region prompt is read. `clip_archive` (OpenAI's `RN50.pt`, ...) and `region_prompt` are only
        used for a detector-only checkpoint (no `backbone.0.*` / `classifier.*` tensors).
        use_nms / target_class_factor / image_scale: default to the checkpoint's `--use_nms` /
        `--target_class_factor` / `--image_scale` (1 when the checkpoint stores none). precision: as for
        the constructor.
        """
        source = str(checkpoint_path)
        checkpoint = load_checkpoint(checkpoint_path)
        weights = pick_weights(checkpoint, use_ema=use_ema, source=source)
        stored = checkpoint.get("args")
        try:
            if has_clip_weights(weights):
                cfg = ModelConfig.from_checkpoint(weights, stored)
            else:
                cfg = _detector_only_config(weights, stored, source, clip_archive, region_prompt)
        except KeyError as e:
            raise CheckpointError(f"{source}: not a CORA state dict (no tensor {e}); keys: {sorted(weights)[:8]} ...") \
                from e
        model, _, _ = build_model(cfg, checkpoint_weights=weights)
        load_detector_weights(model, weights, source=source)
        if image_scale is None:
            # a run setting, not a model one: read from the stored args themselves
            image_scale = float(getattr(stored, "image_scale", 1.0) if stored is not None else 1.0)
        return cls(model, use_nms=cfg.use_nms if use_nms is None else use_nms,
                   target_class_factor=cfg.target_class_factor if target_class_factor is None else target_class_factor,
                   resize=resize, cache_dir=cache_dir, disk_cache=disk_cache, device=device, image_scale=image_scale,
                   precision=precision)

    # ---------------------------------------------------------------- pieces of predict()
    def preprocess(self, image: ImageInput, *, index: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """`(tensor [3,H',W'] float32 CLIP-normalised, (h, w) of the image as given)`: the val transform
        of `datasets/transforms.py` (bilinear resize unless `resize=False`, to_tensor, normalise)."""
        rgb = load_rgb(image, index=index)
        width, height = rgb.size
        if self.resize:
            size, max_size = (VAL_SIZE, MAX_SIZE) if self.image_scale == 1.0 else (
                max(1, round(VAL_SIZE * self.image_scale)), max(1, round(MAX_SIZE * self.image_scale)))
            rgb, _ = resize(rgb, None, size, max_size)
        tensor, _ = self._to_tensor(rgb, None)
        if min(tensor.shape[-2:]) < MIN_SIDE:
            raise ValueError(f"{_describe(image, index)}: {height}x{width} pixels become {tuple(tensor.shape[-2:])} "
                             f"after preprocessing; CORA needs at least {MIN_SIDE} pixels per side (the CLIP "
                             f"ResNet downsamples by 32), i.e. an aspect ratio of at most about 40:1")
        return tensor, (height, width)

    def text_embeddings(self, vocabulary: Sequence[str]) -> torch.Tensor:
        """`[C, D]` normalised text embeddings of the (normalised) vocabulary, through the memory and disk caches."""
        names = normalize_vocabulary(vocabulary)
        fill_text_cache(self.model.classifier, names, self.text_cache)
        return self.model.classifier(list(names))

    def truncated_names(self, vocabulary: Sequence[str]) -> list[str]:
        """The class names whose prompts are longer than the model's `text_len` tokens (CLIP's tokenizer
        cuts them, as the original does; two such names may end up with one embedding)."""
        return self.model.classifier.truncated(normalize_vocabulary(vocabulary))

    def check_names(self, vocabulary: Sequence[str]) -> None:
        """Names the text encoder cannot tell apart are an error; names it cuts, a warning (once each)."""
        names = normalize_vocabulary(vocabulary)
        classifier = self.model.classifier
        clashes = classifier.indistinguishable(names)
        if clashes:
            raise ValueError(f"vocabulary: {clashes[0]} are cut to the same {classifier.text_len} tokens in every "
                             f"prompt and would get one embedding; shorten them (the model reads "
                             f"{classifier.text_len} tokens per prompt, start and end included)")
        cut = [n for n in self.truncated_names(names) if n not in self._warned_cut]
        if cut:
            self._warned_cut.update(cut)
            warnings.warn(f"{len(cut)} class name(s) are cut to the model's {classifier.text_len} tokens in some of "
                          f"the 80 prompt templates (as the original does): {cut[:10]}", stacklevel=3)

    def boost_for(self, vocabulary: Sequence[str], novel_indices: Sequence[int] | None = None) -> NovelBoost | None:
        """The novel-class boost for this vocabulary (module doc): None unless `target_class_factor` is not 1
        and the novel classes are known (`novel_indices`, or the COCO-OVD list recognised by itself)."""
        if novel_indices is not None:
            return resolve_boost(self.target_class_factor, novel_indices, len(vocabulary), what="the vocabulary")
        novel = novel_indices_for(tuple(vocabulary))
        return resolve_boost(self.target_class_factor, novel, len(vocabulary)) if novel else None

    @torch.no_grad()
    def detect(self, tensors: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]], vocabulary: Sequence[str], *,
               score_threshold: float = 0.0, max_detections: int = 100, novel_indices: Sequence[int] | None = None,
               clip_boxes: bool = True, sources: Sequence[str | None] | None = None) -> list[Detections]:
        """`models.inference.detect` on already preprocessed images, all in one batch.

        tensors: `[3,H_i,W_i]` CLIP-normalised images (zero-padded together when sizes differ);
        sizes: `(h, w)` per image, the pixel frame the boxes are returned in (the original image's size).
        """
        names = normalize_vocabulary(vocabulary)
        if len(tensors) != len(sizes):
            raise ValueError(f"detect: {len(tensors)} images but {len(sizes)} sizes")
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold {score_threshold}: expected a value in [0, 1]")
        if int(max_detections) != max_detections or max_detections < 1:
            raise ValueError(f"max_detections {max_detections}: expected a positive integer")
        boost = self.boost_for(names, novel_indices)
        self.check_names(names)
        fill_text_cache(self.model.classifier, names, self.text_cache)
        samples = nested_tensor_from_tensor_list([t.to(self.device, torch.float32) for t in tensors])
        target_sizes = torch.as_tensor([list(s) for s in sizes], device=self.device)
        post = PostProcess(max_detections=int(max_detections), use_nms=self.use_nms)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            results = detect(self.model, samples, list(names), postprocess=post, target_sizes=target_sizes,
                             boost=boost).results
        factor = boost.factor if boost is not None else 1.0
        detections = []
        for i, (res, (h, w)) in enumerate(zip(results, sizes)):
            keep = res["scores"] >= score_threshold
            scores, labels, boxes = res["scores"][keep], res["labels"][keep], res["boxes"][keep]
            order = scores.argsort(descending=True, stable=True)  # PostProcess's order, made explicit
            scores, labels, boxes = scores[order].cpu(), labels[order].cpu(), boxes[order].float().cpu()
            if clip_boxes:
                boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
                boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            detections.append(Detections(
                boxes=boxes, scores=scores, labels=labels, names=[names[j] for j in labels.tolist()],
                image_size=(int(h), int(w)), vocabulary=names,
                source=None if sources is None else sources[i],
                extra={"target_class_factor": factor},
            ))
        return detections

    def predict(self, images: ImageInput | Sequence[ImageInput], vocabulary: Sequence[str], *,
                score_threshold: float = 0.0, max_detections: int = 100, batch_size: int = 1,
                novel_indices: Sequence[int] | None = None, clip_boxes: bool = True) -> list[Detections]:
        """Detect the classes of `vocabulary` in `images`; one `Detections` per image, in input order.

        images: file paths, PIL images (any mode) or numpy arrays `[H,W]`, `[H,W,3]`, `[H,W,4]` (RGB
        order), or a single one of these (the result is still a list). vocabulary: class names or
        phrases (see `normalize_vocabulary`). score_threshold: keep detections with score >= it (0 keeps
        all that the evaluation keeps: NMS over scores > 0.001, then the top `max_detections`).
        batch_size: images per forward pass (module doc: >1 pads images of different sizes).
        novel_indices: classes to boost by `target_class_factor` (LVIS rare classes), indices into the
        normalised vocabulary (`Detections.vocabulary`); the COCO-OVD list is recognised by itself.
        Boxes: xyxy pixels of each image as given (see `Detections`).
        """
        if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
            images = [images]
        images = list(images)
        names = normalize_vocabulary(vocabulary)
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size {batch_size}: expected a positive integer")
        out: list[Detections] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            prepared = [self.preprocess(img, index=start + i) for i, img in enumerate(chunk)]
            sources = [str(img) if isinstance(img, (str, os.PathLike)) else None for img in chunk]
            out.extend(self.detect([t for t, _ in prepared], [s for _, s in prepared], names,
                                   score_threshold=score_threshold, max_detections=max_detections,
                                   novel_indices=novel_indices, clip_boxes=clip_boxes, sources=sources))
        return out


def check_precision(precision: str, device: torch.device) -> str:
    """`precision` if the device can run it: 'fp32' anywhere, 'bf16' on a CPU with native bfloat16
    (oneDNN's AVX512-BF16 / AMX kernels) or a CUDA device that supports it."""
    if precision not in Predictor.PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {list(Predictor.PRECISIONS)}")
    if precision == "bf16":
        if device.type == "cpu":
            supported = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        elif device.type == "cuda":
            supported = torch.cuda.is_bf16_supported()
        else:
            supported = False
        if not supported:
            raise ValueError(f"precision 'bf16': this {device.type} has no native bfloat16 support (a CPU needs "
                             f"AVX512-BF16 or AMX); use precision 'fp32'")
    return precision


def _detector_only_config(weights, stored, source: str, clip_archive, region_prompt) -> ModelConfig:
    """A checkpoint without CLIP tensors (e.g. the bundled toy model): CLIP from `clip_archive`, the region
    prompt from `region_prompt` (required when the run trained with one and the file has no attention pool)."""
    if clip_archive is None:
        raise CheckpointError(f"{source} holds no CLIP weights (no backbone.0.body.* / classifier.* tensors): give "
                              f"the OpenAI CLIP archive it was trained with (Predictor: clip_archive=, command line: "
                              f"--model_path)")
    if not Path(clip_archive).is_file():
        raise FileNotFoundError(f"CLIP archive {clip_archive}: file not found")
    has_pool = any(k.startswith("backbone.0.attn_pool.") for k in weights)
    trained_with = getattr(stored, "region_prompt_path", "") if stored is not None else ""
    if region_prompt is None and not has_pool and trained_with:
        raise CheckpointError(f"{source} holds no attention-pool weights and was trained with --region_prompt_path "
                              f"{trained_with}: give that file (Predictor: region_prompt=, command line: "
                              f"--region_prompt_path)")
    return ModelConfig.from_checkpoint(weights, stored, model_path=str(clip_archive),
                                       region_prompt_path=str(region_prompt) if region_prompt else "")
