"""Contrastive pretraining of the miniature CLIP on the toy image-text set, exported as an OpenAI archive.

    python -m tools.toy.train_clip --data data/toy --out data/toy/clip_toy.pt          # ~8 min on 2 CPU cores
    python -m tools.toy.train_clip --data data/toy --out data/toy/clip_toy.pt --eval_only

Writes `--out` (OpenAI-format TorchScript, read by `models.clip.read_clip_archive` and
`open_clip.load_openai_model`) and `<out without .pt>.json`: the sizes, the training curve, wall time
and the zero-shot accuracy on the held-out single-object crops (`clip/test/`), per base / novel
class, measured through the project's own path: the archive read back, the frozen image trunk of
`models.clip.build_visual`, and the detector's text classifier (80 prompt templates).

Loss: CLIP's symmetric InfoNCE, except that captions naming the same shapes (in the same order,
whatever their colour words and templates) count as positives of each other (`caption_key`;
`--positives captions`: identical captions only). With 16 classes every batch holds several pictures
of each shape; as negatives "a star" and "a red star" would contradict each other on every red star
(300 steps of 256 without the pre-matching term: val region accuracy 43% with name positives, 28%
with caption positives). Each step also pairs one jittered object box per image with the object's
own caption, embedded through both of the detector's region paths: the region path that scores
final boxes (layer3 RoIAlign -> layer4 -> attention pool) and anchor pre-matching's pooling of the
layer4 map (`models.prematch.efficient_region_embeddings`): two more InfoNCE terms
(`train(regions=...)`; `--no_region_pairs` drops them). The image tower runs in bfloat16 autocast
(`--precision fp32` for full precision), channels-last: 2x faster on a CPU.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import roi_align

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from open_clip.tokenizer import SimpleTokenizer  # noqa: E402

from datasets.transforms import CLIP_MEAN, CLIP_STD  # noqa: E402
from models.prematch import efficient_region_embeddings  # noqa: E402
from tools.toy.clip_export import ToyCLIP, ToyCLIPConfig, export_archive  # noqa: E402
from tools.toy.world import BASE_NAMES, CLASS_NAMES, NOVEL_NAMES  # noqa: E402
from util.box_ops import box_xyxy_to_cxcywh  # noqa: E402
from util.nested_tensor import NestedTensor  # noqa: E402

TRAIN_CONTEXT = 32  # captions are < 20 tokens; the causal text tower makes this equal to 77 (ToyCLIP.encode_text)
_CLASS_WORD = re.compile(r"\b(" + "|".join(CLASS_NAMES) + r")\b")
POSITIVES = ("names", "captions")
PREMATCH_WEIGHT = 0.5


def caption_key(caption: str, positives: str = "names") -> str:
    """What makes two captions positives of each other: the shape names they mention, in order
    ('a red star and a heart' -> 'star heart'), or with `positives='captions'` the caption itself."""
    if positives not in POSITIVES:
        raise ValueError(f"positives={positives!r}: expected one of {POSITIVES}")
    return " ".join(_CLASS_WORD.findall(caption)) if positives == "names" else caption


def _key_ids(captions: list[str], positives: str) -> torch.Tensor:
    """`[N]` integer ids, equal where `caption_key` is equal."""
    _, ids = np.unique(np.asarray([caption_key(c, positives) for c in captions]), return_inverse=True)
    return torch.from_numpy(ids.reshape(-1))


def load_images(folder: Path, records: list[dict[str, Any]]) -> torch.Tensor:
    """uint8 `[N, 3, R, R]` of every record's JPEG."""
    arrays = [np.asarray(Image.open(io.BytesIO((folder / r["file_name"]).read_bytes())).convert("RGB"))
              for r in records]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 `[N, 3, R, R]` -> CLIP-normalised float32."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def augment(images: torch.Tensor, generator: torch.Generator,
            boxes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random flips and quarter turns: the world's shapes come at any angle, so labels never change.

    images `[N, 3, R, R]`; boxes `[N, 4]` xyxy pixels (one per image) follow the same moves.
    """
    n, size = images.shape[0], images.shape[-1]
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    k = int(torch.randint(4, (1,), generator=generator))
    images = torch.rot90(images, k, dims=(-2, -1)).contiguous()
    if boxes is None:
        return images, None
    x0, y0, x1, y1 = boxes.unbind(-1)
    x0, x1 = torch.where(flip, size - x1, x0), torch.where(flip, size - x0, x1)
    for _ in range(k):  # rot90 over (H, W) moves pixel (row r, col c) to (size - 1 - c, r)
        x0, y0, x1, y1 = y0, size - x1, y1, size - x0
    return images, torch.stack([x0, y0, x1, y1], dim=-1)


def jitter_boxes(boxes: torch.Tensor, size: int, generator: torch.Generator, amount: float = 0.15) -> torch.Tensor:
    """xyxy `[N, 4]` boxes with their sides scaled by up to e^±amount and centres moved by up to ±amount/2 of
    a side: the detector classifies its own, inexact boxes."""
    centre, side = (boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]
    side = side * torch.exp((2 * torch.rand(side.shape, generator=generator) - 1) * amount)
    centre = centre + (torch.rand(side.shape, generator=generator) - 0.5) * amount * side
    return torch.cat([centre - side / 2, centre + side / 2], dim=-1).clamp(0, size)


def embed_views(model: ToyCLIP, images: torch.Tensor, boxes: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Image embeddings `[N, D]` and, with `boxes` (`[N, 4]` xyxy pixels, one per image), the boxes' embeddings
    `[N, D]` through the detector's two region paths, from one trunk pass:

    * region path (`models.region_head`, scores the detector's boxes): layer3 RoI-aligned to 2S x 2S, then
      layer4 and the attention pool;
    * pre-matching path (`models.prematch.efficient_region_embeddings`, matches anchors to classes): the
      image's layer4 map RoI-aligned to S x S and pooled without the mean token as key (L2-normalised, fp32).
    """
    visual = model.visual
    layer3 = visual.layer3(visual.layer2(visual.layer1(visual.stem(images))))
    layer4 = visual.layer4(layer3)
    image = visual.attnpool(layer4)
    if boxes is None:
        return (image,)
    grid = 2 * model.cfg.attnpool_grid
    rois = torch.cat([torch.arange(len(boxes), dtype=boxes.dtype, device=boxes.device)[:, None], boxes], dim=1)
    stride = images.shape[-1] / layer3.shape[-1]
    aligned = roi_align(layer3, rois.to(layer3.dtype), output_size=(grid, grid), spatial_scale=1 / stride,
                        sampling_ratio=-1, aligned=True)
    region = visual.attnpool(visual.layer4(aligned))
    size = torch.tensor(images.shape[-2:][::-1], dtype=boxes.dtype, device=boxes.device).repeat(2)
    cxcywh = box_xyxy_to_cxcywh(boxes) / size
    unpadded = torch.zeros(layer4.shape[0], *layer4.shape[-2:], dtype=torch.bool, device=layer4.device)
    prematch = efficient_region_embeddings(visual.attnpool, NestedTensor(layer4, unpadded), cxcywh[:, None])[:, 0]
    return image, region, prematch


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, caption_ids: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of L2-normalised `[B, D]` pairs; identical captions are mutual positives."""
    logits = logit_scale.exp().clamp(max=100) * image @ text.t()
    positive = (caption_ids[:, None] == caption_ids[None, :]).float()
    target = positive / positive.sum(dim=1, keepdim=True)
    return 0.5 * (-(target * F.log_softmax(logits, dim=1)).sum(1).mean()
                  - (target * F.log_softmax(logits.t(), dim=1)).sum(1).mean())


def _param_groups(model: ToyCLIP, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # norms, biases, embeddings and the temperature are not decayed (as open_clip's training)
        (no_decay if p.ndim < 2 or "embedding" in name or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _region_table(regions: list[list[dict[str, Any]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Flatten per-image region lists: (first index `[N]`, count `[N]`, xyxy boxes `[M, 4]`, captions `[M]`)."""
    counts = torch.tensor([len(r) for r in regions])
    first = torch.cumsum(counts, 0) - counts
    flat = [region for image_regions in regions for region in image_regions]
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["box"] for r in flat)],
                         dtype=torch.float32).reshape(-1, 4)
    return first, counts, boxes, [r["caption"] for r in flat]


def train(*, images: torch.Tensor, captions: list[str], cfg: ToyCLIPConfig, steps: int, batch_size: int = 128,
          lr: float = 3e-3, weight_decay: float = 0.05, warmup: int = 30, seed: int = 0,
          log_every: int = 25, regions: list[list[dict[str, Any]]] | None = None, positives: str = "names",
          prematch_weight: float = PREMATCH_WEIGHT,
          precision: str = "bf16") -> tuple[ToyCLIP, list[dict[str, float]]]:
    """Train a ToyCLIP from scratch; returns it (eval mode, fp32) and the logged `{'step', 'loss', 's'}` curve.

    regions: per image, `{'box': [x, y, w, h], 'caption'}` of its objects. When given, every step also
    pairs one jittered box per image with its own caption, through the detector's region path and
    through anchor pre-matching's pooling (`embed_views`): loss = (image term + region term) / 2 +
    `prematch_weight` x pre-matching term. CLIP learns what boxes of a scene look like, as real CLIP
    learns it from the many crops of web data, which a 16-class world lacks.
    positives: `caption_key`. precision: 'bf16' (autocast of the image tower) or 'fp32'.
    """
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision={precision!r}: expected 'bf16' or 'fp32'")
    if prematch_weight < 0:
        raise ValueError(f"prematch_weight={prematch_weight}: expected a weight >= 0")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = ToyCLIP(cfg).to(memory_format=torch.channels_last)
    tokenizer = SimpleTokenizer()
    tokens = tokenizer(captions, context_length=TRAIN_CONTEXT)
    caption_ids = _key_ids(captions, positives)
    if regions is not None:
        if len(regions) != len(captions):
            raise ValueError(f"regions: {len(regions)} lists for {len(captions)} images")
        first, counts, region_boxes, region_captions = _region_table(regions)
        region_tokens = tokenizer(region_captions, context_length=TRAIN_CONTEXT)
        region_ids = _key_ids(region_captions, positives)
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    curve, tic, running = [], time.time(), []
    model.train()
    for step in range(steps):
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) /
                                                                             max(steps - warmup, 1)))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        idx = torch.randint(len(captions), (batch_size,), generator=generator)
        boxes = None
        if regions is not None:
            idx = idx[counts[idx] > 0]
            pick = first[idx] + (torch.rand(len(idx), generator=generator) * counts[idx]).long()
            boxes = region_boxes[pick]
        batch, boxes = augment(images[idx], generator, boxes)
        if boxes is not None:
            boxes = jitter_boxes(boxes, batch.shape[-1], generator)
        batch = normalise(batch).contiguous(memory_format=torch.channels_last)
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            views = [F.normalize(v.float(), dim=-1) for v in embed_views(model, batch, boxes)]
        if regions is None:
            text_emb = F.normalize(model.encode_text(tokens[idx]), dim=-1)
            loss = contrastive_loss(views[0], text_emb, caption_ids[idx], model.logit_scale)
        else:
            text_emb = F.normalize(model.encode_text(torch.cat([tokens[idx], region_tokens[pick]])), dim=-1)
            image_text, region_text = text_emb[:len(idx)], text_emb[len(idx):]
            loss = (0.5 * (contrastive_loss(views[0], image_text, caption_ids[idx], model.logit_scale)
                           + contrastive_loss(views[1], region_text, region_ids[pick], model.logit_scale))
                    + prematch_weight * contrastive_loss(views[2], region_text, region_ids[pick], model.logit_scale))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "loss": float(np.mean(running)), "s": round(time.time() - tic, 1)})
            running = []
            print(f"step {step + 1}/{steps} loss {curve[-1]['loss']:.4f} ({curve[-1]['s']} s)", flush=True)
    return model.to(memory_format=torch.contiguous_format).eval(), curve


@torch.no_grad()
def zero_shot_accuracy(archive: str | os.PathLike, test_folder: Path, records: list[dict[str, Any]], *,
                       text_len: int = 25, batch_size: int = 200) -> dict[str, Any]:
    """Top-1 accuracy over the 16 class names on single-object crops, through the detector's CLIP path."""
    from models.clip import build_text_classifier, build_visual, read_clip_archive, visual_state_dict

    arch, state = read_clip_archive(os.fspath(archive))
    visual = build_visual(arch).eval()
    visual.load_state_dict({k: v.float() for k, v in visual_state_dict(state).items()})
    classifier = build_text_classifier(arch, text_len, state).float()
    text = classifier(list(CLASS_NAMES))
    images = load_images(test_folder, records)
    labels = torch.tensor([CLASS_NAMES.index(r["names"][0]) for r in records])
    preds = torch.cat([(F.normalize(visual(normalise(chunk)), dim=-1) @ text.t()).argmax(1)
                       for chunk in images.split(batch_size)])
    per_class = {name: float((preds[labels == i] == i).float().mean()) for i, name in enumerate(CLASS_NAMES)}
    return {
        "all": float((preds == labels).float().mean()),
        "base": float(np.mean([per_class[n] for n in BASE_NAMES])),
        "novel": float(np.mean([per_class[n] for n in NOVEL_NAMES])),
        "per_class": per_class,
        "chance": 1 / len(CLASS_NAMES),
    }


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("toy CLIP", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/toy", type=str, help="output folder of tools.toy.make_dataset")
    p.add_argument("--out", default="data/toy/clip_toy.pt", type=str)
    p.add_argument("--steps", default=900, type=int)
    p.add_argument("--batch_size", default=128, type=int)
    p.add_argument("--lr", default=3e-3, type=float)
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--vision_width", default=16, type=int)
    p.add_argument("--output_dim", default=64, type=int)
    p.add_argument("--text_width", default=64, type=int)
    p.add_argument("--text_layers", default=2, type=int)
    p.add_argument("--threads", default=2, type=int)
    p.add_argument("--positives", default="names", choices=POSITIVES,
                   help="which captions are positives of each other: naming the same shapes, or identical")
    p.add_argument("--prematch_weight", default=PREMATCH_WEIGHT, type=float,
                   help="weight of the region-text term through anchor pre-matching's pooling")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="autocast of the image tower")
    p.add_argument("--no_region_pairs", dest="region_pairs", action="store_false",
                   help="image-text pairs only, no region-text terms")
    p.add_argument("--eval_only", action="store_true", help="only measure the zero-shot accuracy of --out")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    test = json.loads((data / "clip" / "labels_test.json").read_text())
    report_path = Path(args.out).with_suffix(".json")
    if args.eval_only:
        report = zero_shot_accuracy(args.out, data / "clip" / "test", test["images"])
        print(json.dumps({k: report[k] for k in ("all", "base", "novel")}))
        return report
    meta = json.loads((data / "clip" / "captions_train.json").read_text())
    resolution = meta["resolution"]
    if resolution % 32:
        raise ValueError(f"{data}: crop resolution {resolution} is not a multiple of 32 (32 x attention-pool grid)")
    cfg = ToyCLIPConfig(vision_width=args.vision_width, attnpool_grid=resolution // 32, output_dim=args.output_dim,
                        text_width=args.text_width, text_layers=args.text_layers)
    tic = time.time()
    images = load_images(data / "clip" / "train", meta["images"])
    captions = [r["caption"] for r in meta["images"]]
    regions = [r.get("regions", []) for r in meta["images"]] if args.region_pairs else None
    model, curve = train(images=images, captions=captions, cfg=cfg, steps=args.steps, batch_size=args.batch_size,
                         lr=args.lr, seed=args.seed, regions=regions, positives=args.positives,
                         prematch_weight=args.prematch_weight, precision=args.precision)
    # the fp32 weights first: an export that fails must not cost the training
    torch.save({"config": cfg.to_dict(), "model": model.state_dict()}, Path(args.out).with_suffix(".fp32.pth"))
    export_archive(model, args.out)
    train_s = time.time() - tic
    accuracy = zero_shot_accuracy(args.out, data / "clip" / "test", test["images"])
    report = {"config": cfg.to_dict(), "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
              "region_pairs": args.region_pairs, "positives": args.positives,
              "prematch_weight": args.prematch_weight, "precision": args.precision,
              "seed": args.seed, "train_seconds": round(train_s, 1), "curve": curve, "zero_shot": accuracy,
              "archive_bytes": os.path.getsize(args.out)}
    report_path.write_text(json.dumps(report, indent=1))
    print(json.dumps({"zero_shot": {k: round(accuracy[k], 4) for k in ("all", "base", "novel", "chance")},
                      "train_seconds": report["train_seconds"]}))
    return report


if __name__ == "__main__":
    main()
