"""Contrastive pretraining of the miniature CLIP on the toy image-text set, exported as an OpenAI archive.

    python -m tools.toy.train_clip --data data/toy --out data/toy/clip_toy.pt          # ~15 min on 2 CPU cores
    python -m tools.toy.train_clip --data data/toy --out data/toy/clip_toy.pt --eval_only

Writes `--out` (OpenAI-format TorchScript, read by `models.clip.read_clip_archive` and
`open_clip.load_openai_model`) and `<out without .pt>.json`: the sizes, the training curve, wall time
and the zero-shot accuracy on the held-out single-object crops (`clip/test/`), per base / novel
class, measured through the project's own path: the archive read back, the frozen image trunk of
`models.clip.build_visual`, and the detector's text classifier (80 prompt templates).

Loss: CLIP's symmetric InfoNCE, except that pairs with identical captions count as positives of
each other (16 classes make duplicates in every batch; as negatives they would contradict each other).
Each step also pairs one jittered object box per image, embedded through the detector's region path,
with the object's own caption (a second InfoNCE term, `train(regions=...)`; `--no_region_pairs` drops it).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
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
from tools.toy.clip_export import ToyCLIP, ToyCLIPConfig, export_archive  # noqa: E402
from tools.toy.world import BASE_NAMES, CLASS_NAMES, NOVEL_NAMES  # noqa: E402

TRAIN_CONTEXT = 32  # captions are < 20 tokens; the causal text tower makes this equal to 77 (ToyCLIP.encode_text)


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
    """Image embeddings `[N, D]` and, with `boxes` (`[N, 4]` xyxy pixels), region embeddings `[N, D]` through the
    detector's region path (`models.region_head`): layer3 RoI-aligned to 2S x 2S, then layer4 and the attention
    pool. One trunk pass serves both."""
    visual = model.visual
    layer3 = visual.layer3(visual.layer2(visual.layer1(visual.stem(images))))
    image = visual.attnpool(visual.layer4(layer3))
    if boxes is None:
        return (image,)
    grid = 2 * model.cfg.attnpool_grid
    rois = torch.cat([torch.arange(len(boxes), dtype=boxes.dtype)[:, None], boxes], dim=1)
    stride = images.shape[-1] / layer3.shape[-1]
    aligned = roi_align(layer3, rois, output_size=(grid, grid), spatial_scale=1 / stride, sampling_ratio=-1,
                        aligned=True)
    return image, visual.attnpool(visual.layer4(aligned))


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


def train(*, images: torch.Tensor, captions: list[str], cfg: ToyCLIPConfig, steps: int, batch_size: int = 256,
          lr: float = 2e-3, weight_decay: float = 0.05, warmup: int = 30, seed: int = 0,
          log_every: int = 25,
          regions: list[list[dict[str, Any]]] | None = None) -> tuple[ToyCLIP, list[dict[str, float]]]:
    """Train a ToyCLIP from scratch; returns it (eval mode) and the logged `{'step', 'loss', 's'}` curve.

    regions: per image, `{'box': [x, y, w, h], 'caption'}` of its objects. When given, every step also
    pairs one jittered box per image, embedded through the detector's region path, with its own
    caption (a second InfoNCE term of the same weight): CLIP learns what boxes of a scene look like,
    as real CLIP learns it from the many crops of web data, which a 16-class world lacks.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = ToyCLIP(cfg)
    tokenizer = SimpleTokenizer()
    tokens = tokenizer(captions, context_length=TRAIN_CONTEXT)
    _, caption_ids = np.unique(np.asarray(captions), return_inverse=True)
    caption_ids = torch.from_numpy(caption_ids.reshape(-1))
    if regions is not None:
        if len(regions) != len(captions):
            raise ValueError(f"regions: {len(regions)} lists for {len(captions)} images")
        first, counts, region_boxes, region_captions = _region_table(regions)
        region_tokens = tokenizer(region_captions, context_length=TRAIN_CONTEXT)
        _, region_ids = np.unique(np.asarray(region_captions), return_inverse=True)
        region_ids = torch.from_numpy(region_ids.reshape(-1))
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    curve, tic, running = [], time.time(), []
    model.train()
    for step in range(steps):
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) /
                                                                             max(steps - warmup, 1)))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        idx = torch.randint(len(captions), (batch_size,), generator=generator)
        if regions is None:
            batch, _ = augment(images[idx], generator)
            image_emb, text_emb = model(normalise(batch), tokens[idx])
            loss = contrastive_loss(image_emb, text_emb, caption_ids[idx], model.logit_scale)
        else:
            idx = idx[counts[idx] > 0]
            pick = first[idx] + (torch.rand(len(idx), generator=generator) * counts[idx]).long()
            batch, boxes = augment(images[idx], generator, region_boxes[pick])
            boxes = jitter_boxes(boxes, batch.shape[-1], generator)
            image_emb, region_emb = embed_views(model, normalise(batch), boxes)
            text_emb = model.encode_text(torch.cat([tokens[idx], region_tokens[pick]]))
            text_emb = F.normalize(text_emb, dim=-1)
            loss = 0.5 * (contrastive_loss(F.normalize(image_emb, dim=-1), text_emb[:len(idx)], caption_ids[idx],
                                           model.logit_scale)
                          + contrastive_loss(F.normalize(region_emb, dim=-1), text_emb[len(idx):], region_ids[pick],
                                             model.logit_scale))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "loss": float(np.mean(running)), "s": round(time.time() - tic, 1)})
            running = []
            print(f"step {step + 1}/{steps} loss {curve[-1]['loss']:.4f} ({curve[-1]['s']} s)", flush=True)
    return model.eval(), curve


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
    p.add_argument("--steps", default=700, type=int)
    p.add_argument("--batch_size", default=256, type=int)
    p.add_argument("--lr", default=3e-3, type=float)
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--vision_width", default=16, type=int)
    p.add_argument("--output_dim", default=64, type=int)
    p.add_argument("--text_width", default=64, type=int)
    p.add_argument("--text_layers", default=2, type=int)
    p.add_argument("--threads", default=2, type=int)
    p.add_argument("--no_region_pairs", dest="region_pairs", action="store_false",
                   help="image-text pairs only, no region-text term (README: region accuracy falls to ~19%%)")
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
                         lr=args.lr, seed=args.seed, regions=regions)
    # the fp32 weights first: an export that fails must not cost the training
    torch.save({"config": cfg.to_dict(), "model": model.state_dict()}, Path(args.out).with_suffix(".fp32.pth"))
    export_archive(model, args.out)
    train_s = time.time() - tic
    accuracy = zero_shot_accuracy(args.out, data / "clip" / "test", test["images"])
    report = {"config": cfg.to_dict(), "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
              "region_pairs": args.region_pairs,
              "seed": args.seed, "train_seconds": round(train_s, 1), "curve": curve, "zero_shot": accuracy,
              "archive_bytes": os.path.getsize(args.out)}
    report_path.write_text(json.dumps(report, indent=1))
    print(json.dumps({"zero_shot": {k: round(accuracy[k], 4) for k in ("all", "base", "novel", "chance")},
                      "train_seconds": report["train_seconds"]}))
    return report


if __name__ == "__main__":
    main()
