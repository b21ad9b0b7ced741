"""Region prompting (SPEC §4): learn the positional embedding of CLIP's attention pool for boxes.

    bash configs/COCO/region_prompt_R50.sh RN50 8 local          # what the paper's pipeline runs first
    torchrun --nproc_per_node=8 tools/region_prompt.py --coco_path data/coco --backbone clip_RN50 \\
        --output logs/region_prompt_R50.pth

CLIP stays frozen; the only trainable tensor is `attnpool.positional_embedding` `[S*S+1, E]`,
initialised from CLIP's. For every ground-truth box of `instances_train2017_base.json` the box is
scored by the region classifier the localizer uses at test time (`models.region_head`: RoIAlign
2S x 2S on layer3 -> CLIP layer4 -> attention pool -> L2-normalise), its logits are
`100 * cos(region, text)` against the base-class text embeddings (80 templates, `--text_len 25`),
and the loss is the cross-entropy with the box's label, averaged over all boxes of the batch.
AdamW (lr 1e-4, weight decay 1e-4), gradient norm clipped to 0.1, 5 epochs with StepLR(4, 0.1),
4 images per process, the localizer's train transforms. This is the original's `region` branch
(commit 38124c2, `configs/COCO_RN50.sh`), whose one training step `tests/test_region_prompt.py`
reproduces from a golden file.

Outputs: `--output` = `{'attnpool.positional_embedding': tensor [S*S+1, E]}`, the file the
localizer's `--region_prompt_path` loads, written once training has finished (so its presence
means "stage done"); `<output_dir>/checkpoint.pth` after every epoch (atomic; a run started again
with the same command resumes from it); `<output_dir>/log.txt` (one JSON object per epoch); and
`<output_dir>/region_accuracy.json`: region classification accuracy of the val json's ground-truth
boxes over its 65 categories, base and novel, with CLIP's positional embedding and with the prompt.

Distributed runs (torchrun / slurm, detected by `util.dist`) average the prompt's gradient over
processes, which is what DDP does for the original; the single tensor is all-reduced directly so
that a process whose images hold no box (zero gradient, as the original's `logits.sum() * 0`) never
leaves DDP waiting for a gradient.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

import torch  # noqa: E402
import torch.distributed  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler  # noqa: E402

from datasets.coco import OVD_VAL_JSON, CocoDetection  # noqa: E402
from datasets.lvis import LVIS_TRAIN_JSON, LVIS_VAL_JSON, LvisDetection  # noqa: E402
from datasets.ovd_eval import ovd_split  # noqa: E402
from datasets.transforms import make_coco_transforms  # noqa: E402
from models.backbone import Backbone  # noqa: E402
from models.clip import (  # noqa: E402
    CLIPArchitecture,
    TextClassifier,
    build_text_classifier,
    build_visual,
    load_region_prompt,
    read_clip_archive,
    resolve_archive_path,
    visual_state_dict,
)
from models.prematch import efficient_region_embeddings  # noqa: E402
from models.region_head import region_embeddings  # noqa: E402
from util import dist  # noqa: E402
from util.atomic import write_json  # noqa: E402
from util.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from util.logging import MetricLogger, SmoothedValue  # noqa: E402
from util.nested_tensor import NestedTensor, collate_fn  # noqa: E402
from util.rng import rng_state, set_rng_state  # noqa: E402
from util.run import append_log, check_finite, resume_path, run_cli, start_run, to_device  # noqa: E402

PROMPT_KEY = "attnpool.positional_embedding"  # the key the localizer's region prompt file holds
TAU = 100.0  # CLIP's logit scale, hard-coded in the original
TRAIN_JSON = "instances_train2017_base.json"


# ----------------------------------------------------------------------------------------------
# The region classifier: CLIP's image tower scoring boxes, with the region prompt as the only
# tensor that can be trained.


class RegionClassifier(nn.Module):
    """Frozen CLIP ModifiedResNet that embeds boxes (`models.region_head.region_embeddings`).

    `trunk` is the localizer's `Backbone` (same modules, same state-dict names under `trunk.`);
    `positional_embedding` is its attention pool's `[S*S+1, E]` positional embedding, the region prompt.
    """

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.trunk = Backbone(visual)

    @property
    def positional_embedding(self) -> nn.Parameter:
        return self.trunk.attn_pool.positional_embedding

    def prompt_state(self) -> dict[str, torch.Tensor]:
        """The region prompt file's content: `{'attnpool.positional_embedding': [S*S+1, E]}` (CPU copy)."""
        return {PROMPT_KEY: self.positional_embedding.detach().cpu().clone()}

    @torch.no_grad()
    def load_prompt(self, prompt: dict[str, torch.Tensor], *, source: str) -> None:
        """Load a region prompt dict (as `prompt_state` returns it) into the attention pool."""
        if set(prompt) != {PROMPT_KEY}:
            raise ValueError(f"{source}: expected exactly the key {PROMPT_KEY!r}, found {sorted(prompt)}")
        value = prompt[PROMPT_KEY]
        if tuple(value.shape) != tuple(self.positional_embedding.shape):
            raise ValueError(f"{source}: {PROMPT_KEY} has shape {tuple(value.shape)}, expected "
                             f"{tuple(self.positional_embedding.shape)} (another --backbone?)")
        self.positional_embedding.copy_(value)

    def layer3(self, samples: NestedTensor) -> NestedTensor:
        """The trunk's stride-16 map `[B,E/2,H/16,W/16]` with its padding mask, as `Backbone` computes it.

        The trunk's children run in order up to layer3 only: region scoring applies layer4 to the
        RoIs, so layer4 on the whole image would be wasted work.
        """
        x = samples.tensors
        with torch.no_grad():
            for name, module in self.trunk.body.items():
                x = module(x)
                if name == "layer3":
                    break
        mask = F.interpolate(samples.mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
        return NestedTensor(x, mask)

    def prematch_embed(self, layer4: NestedTensor, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        """`[sum N_i, D]` embeddings of boxes by anchor pre-matching's pooling on layer4
        (`models.prematch.efficient_region_embeddings`), image by image (its boxes come `[B,N,4]`)."""
        return torch.cat([
            efficient_region_embeddings(self.trunk.attn_pool, NestedTensor(layer4.tensors[i:i + 1],
                                                                           layer4.mask[i:i + 1]), b[None])[0]
            for i, b in enumerate(boxes)])

    def embed(self, layer3: NestedTensor, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        """`[sum N_i, D]` L2-normalised region embeddings; boxes per image `[N_i,4]` cxcywh normalised
        to the unpadded image."""
        return region_embeddings(self.trunk, layer3, list(boxes))

    def forward(self, samples: NestedTensor, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.embed(self.layer3(samples), boxes)


def build_region_classifier(arch: CLIPArchitecture, clip_state_dict: dict[str, torch.Tensor], *,
                            region_prompt: dict[str, torch.Tensor] | None = None,
                            trainable_prompt: bool = False) -> RegionClassifier:
    """CLIP's image tower (weights from an OpenAI-format state dict), every parameter frozen except,
    with `trainable_prompt`, the attention pool's positional embedding. `region_prompt` (a prompt
    file's dict) overrides CLIP's positional embedding, as the localizer's loader does."""
    visual = build_visual(arch)
    weights = visual_state_dict(clip_state_dict)
    weights.update(region_prompt or {})
    visual.load_state_dict(weights, strict=True)
    model = RegionClassifier(visual)
    model.positional_embedding.requires_grad_(trainable_prompt)
    return model


def region_logits(embeddings: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """`100 * cos`: embeddings `[N,D]` and text features `[C,D]`, both L2-normalised -> `[N,C]`."""
    return TAU * embeddings @ text_features.t()


def region_prompt_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the boxes of the batch; a batch without boxes gives a zero loss
    (the original's `logits.sum() * 0.0`), so every step still takes an optimizer step."""
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def text_embeddings(classifier: TextClassifier, names: Sequence[str]) -> torch.Tensor:
    """`[C,D]` L2-normalised prompt-ensemble embeddings of `names` (80 templates, the classifier's text_len)."""
    return classifier(list(names)).float()


@contextlib.contextmanager
def prompt_swapped(model: RegionClassifier, positional_embedding: torch.Tensor) -> Iterator[None]:
    """Temporarily score with another positional embedding (e.g. CLIP's), restoring the current one."""
    param = model.positional_embedding
    saved = param.detach().clone()
    with torch.no_grad():
        param.copy_(positional_embedding)
    try:
        yield
    finally:
        with torch.no_grad():
            param.copy_(saved)


# ----------------------------------------------------------------------------------------------
# Training


def average_gradient_over_ranks(param: nn.Parameter) -> None:
    """Mean of the gradient over processes (what DDP computes); a no-op in a single process."""
    if dist.get_world_size() < 2:
        return
    grad = param.grad.to(dist.collective_device())
    torch.distributed.all_reduce(grad)
    grad /= dist.get_world_size()
    param.grad.copy_(grad.to(param.grad.device))


def train_step(model: RegionClassifier, optimizer: torch.optim.Optimizer, samples: NestedTensor,
               targets: Sequence[dict[str, Any]], text_features: torch.Tensor, *,
               max_norm: float = 0.1) -> dict[str, torch.Tensor]:
    """One iteration: loss over every box of the batch, backward, rank-average, clip, AdamW step.

    samples: padded images `[B,3,H,W]` + mask (True = padding); targets: per image `boxes` `[N_i,4]`
    cxcywh normalised to the unpadded image and `labels` `[N_i]` (indices into `text_features [C,D]`).
    Returns `loss` (this process's), `logits` `[sum N_i, C]` and `num_boxes`, all detached. The
    clipped gradient stays in `model.positional_embedding.grad`.
    """
    boxes = [t["boxes"] for t in targets]
    labels = torch.cat([t["labels"] for t in targets]).to(text_features.device)
    logits = region_logits(model(samples, boxes), text_features)
    loss = region_prompt_loss(logits, labels)
    param = model.positional_embedding
    optimizer.zero_grad()
    if loss.requires_grad:
        loss.backward()
    if param.grad is None:  # no box in this process's batch: its gradient is zero
        param.grad = torch.zeros_like(param)
    average_gradient_over_ranks(param)
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_([param], max_norm)
    optimizer.step()
    return {"loss": loss.detach(), "logits": logits.detach(), "num_boxes": torch.tensor(labels.numel())}


def _to_device(samples: NestedTensor, targets: Sequence[dict], device: torch.device):
    return samples.to(device, non_blocking=True), to_device(targets, device)


def train_one_epoch(model: RegionClassifier, loader, optimizer: torch.optim.Optimizer, text_features: torch.Tensor,
                    device: torch.device, epoch: int, *, max_norm: float = 0.1,
                    print_freq: int = 100) -> dict[str, float]:
    """One pass over `loader`; returns the global averages of `loss` (rank-averaged), `num_boxes`, `lr`."""
    model.train()
    logger = MetricLogger()
    logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    if dist.get_world_size() == 1:
        print_freq = min(print_freq, 10)
    for iteration, (samples, targets) in enumerate(logger.log_every(loader, print_freq, f"Epoch: [{epoch}]")):
        samples, targets = _to_device(samples, targets, device)
        out = train_step(model, optimizer, samples, targets, text_features, max_norm=max_norm)
        reduced = dist.reduce_dict({"loss": out["loss"]})
        loss_value = reduced["loss"].item()
        check_finite(loss_value, reduced, where=f"region prompting, epoch {epoch} iteration {iteration}")
        logger.update(loss=loss_value, num_boxes=out["num_boxes"].item(), lr=optimizer.param_groups[0]["lr"])
    logger.synchronize_between_processes()
    print("Averaged stats:", logger, flush=True)
    return logger.global_averages()


# ----------------------------------------------------------------------------------------------
# Data


class ShardSampler(Sampler[int]):
    """Indices `rank, rank + world, ...` of `indices`: every item once over all processes (no padding,
    unlike DistributedSampler, so that counts and per-box outputs are not duplicated)."""

    def __init__(self, indices: Sequence[int], *, rank: int, world_size: int):
        self.indices = list(indices)[rank::world_size]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# The jsons each stage reads by default: (train, val) per --dataset_file.
DEFAULT_JSONS = {"coco": (TRAIN_JSON, OVD_VAL_JSON), "lvis": (LVIS_TRAIN_JSON, LVIS_VAL_JSON)}


def annotation_file(coco_path: str | os.PathLike, name: str) -> Path:
    """A json given by name is looked up in `<coco_path>/annotations/`; a path with a folder is taken as is."""
    path = Path(name)
    return path if path.parent != Path(".") else Path(coco_path) / "annotations" / name


def split_files(args, which: str) -> tuple[Path, Path, str]:
    """`(json, image folder, flag)` of the 'train' or 'val' boxes: COCO-format under `--coco_path`
    (annotations/, train2017/, val2017/) or LVIS-format under `--lvis_path` (jsons at its top, images
    by their `coco_url`). `--train_json` / `--val_json` override the json (a bare name: in that folder)."""
    flag = f"--{which}_json"
    name = getattr(args, f"{which}_json") or DEFAULT_JSONS[args.dataset_file][which == "val"]
    if args.dataset_file == "lvis":
        root = Path(args.lvis_path)
        if not root.is_dir():
            raise FileNotFoundError(f"--lvis_path {root or '(empty)'} does not exist")
        path = Path(name)
        return (path if path.parent != Path(".") else root / name), root, flag
    root = Path(args.coco_path)
    if not root.is_dir():
        raise FileNotFoundError(f"--coco_path {root} does not exist")
    return annotation_file(root, name), root / f"{which}2017", flag


def open_boxes(args, which: str, transforms, dataset_class: type | None = None):
    """The images and boxes of `split_files(args, which)`; labels index the json's `category_list` (LVIS:
    `label_map`). `dataset_class` replaces CocoDetection / LvisDetection by a subclass."""
    ann_file, folder, flag = split_files(args, which)
    if not ann_file.is_file():
        raise FileNotFoundError(f"{flag} {ann_file.name}: annotation file {ann_file} not found")
    if args.dataset_file == "lvis":
        return (dataset_class or LvisDetection)(img_folder=folder, ann_file=ann_file, transforms=transforms,
                                                label_map=True)
    return (dataset_class or CocoDetection)(img_folder=folder, ann_file=ann_file, transforms=transforms)


def build_split(args, which: str) -> CocoDetection | LvisDetection:
    """`open_boxes` with the localizer's transforms of that split (CLIP mean/std, `--image_scale`)."""
    return open_boxes(args, which, make_coco_transforms("train" if which == "train" else "val",
                                                        clip_normalisation=True, image_scale=args.image_scale))


def images_with_boxes(dataset: CocoDetection | LvisDetection) -> list[int]:
    """Dataset indices of images with at least one non-crowd annotation (the others have nothing to score)."""
    return [i for i, image_id in enumerate(dataset.ids)
            if any(a.get("iscrowd", 0) == 0 for a in dataset.coco.imgToAnns.get(image_id, []))]


def eval_loader(dataset, indices: Sequence[int], *, batch_size: int, num_workers: int) -> DataLoader:
    sampler = ShardSampler(indices, rank=dist.get_rank(), world_size=dist.get_world_size())
    return DataLoader(dataset, batch_size, sampler=sampler, drop_last=False, collate_fn=collate_fn,
                      num_workers=num_workers)


# ----------------------------------------------------------------------------------------------
# Region classification accuracy on ground-truth boxes


PREMATCH_SUFFIX = ", pre-matching path"


@torch.no_grad()
def region_accuracy(model: RegionClassifier, loader, dataset: CocoDetection, text_features: torch.Tensor,
                    variants: dict[str, torch.Tensor], device: torch.device) -> dict[str, dict[str, Any]]:
    """Top-1 accuracy of the region classifier on every ground-truth box of `loader`, per variant.

    variants: name -> positional embedding to score with (e.g. CLIP's, the learned prompt). The
    trunk runs once per batch; only the attention pool's embedding changes between variants. Each
    variant is measured on two paths: the region path that scores the detector's boxes (layer3
    RoIAlign -> layer4 -> attention pool; result `name`) and anchor pre-matching's pooling on layer4
    (`models.prematch.efficient_region_embeddings`; result `name + PREMATCH_SUFFIX`). Boxes are split
    by their category id into base / novel (`datasets.ovd_eval.ovd_split`: the json's own `split`
    fields, else the COCO-OVD lists). Counts are summed over processes. Returns `{result: {'base',
    'novel', 'all': accuracy or None, 'correct': {...}, 'boxes': {...}}}`.
    """
    model.eval()
    base, novel = ovd_split(dataset.coco.dataset["categories"])
    names = [*variants, *(name + PREMATCH_SUFFIX for name in variants)]
    counts = {name: {"correct": {"base": 0, "novel": 0, "other": 0}, "boxes": {"base": 0, "novel": 0, "other": 0}}
              for name in names}
    logger = MetricLogger()
    for samples, targets in logger.log_every(loader, 10 if dist.get_world_size() == 1 else 100, "Accuracy:"):
        samples, targets = _to_device(samples, targets, device)
        labels = torch.cat([t["labels"] for t in targets]).cpu()
        if labels.numel() == 0:
            continue
        catids = [dataset.label2catid[int(label)] for label in labels]
        split = ["base" if c in base else "novel" if c in novel else "other" for c in catids]
        # both maps as the detector computes them: pre-matching pools from the whole layer4 map
        maps = model.trunk(samples)
        layer3, layer4 = maps["layer3"], maps["layer4"]
        boxes = [t["boxes"] for t in targets]
        for name, pe in variants.items():
            with prompt_swapped(model, pe.to(device)):
                region = model.embed(layer3, boxes)
                prematch = model.prematch_embed(layer4, boxes)
            for result, embeddings in ((name, region), (name + PREMATCH_SUFFIX, prematch)):
                hits = (region_logits(embeddings, text_features).argmax(dim=-1).cpu() == labels).tolist()
                for s, hit in zip(split, hits):
                    counts[result]["boxes"][s] += 1
                    counts[result]["correct"][s] += int(hit)
    gathered = dist.all_gather(counts)
    out = {}
    for name in names:
        correct = {s: sum(g[name]["correct"][s] for g in gathered) for s in ("base", "novel", "other")}
        boxes = {s: sum(g[name]["boxes"][s] for g in gathered) for s in ("base", "novel", "other")}
        correct["all"], boxes["all"] = sum(correct.values()), sum(boxes.values())
        out[name] = {s: (correct[s] / boxes[s] if boxes[s] else None) for s in ("base", "novel", "all")}
        out[name].update(correct=correct, boxes=boxes)
    return out


def accuracy_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table: one row per variant, accuracy in percent for base / novel / all boxes."""
    def pct(value):
        return "-" if value is None else f"{100 * value:.2f}"

    first = next(iter(results.values()))
    lines = ["| region classifier | base | novel | all |", "|---|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {pct(r['base'])} | {pct(r['novel'])} | {pct(r['all'])} |")
    lines.append(f"(top-1 accuracy in %, ground-truth boxes: {first['boxes']['base']} base, "
                 f"{first['boxes']['novel']} novel)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line


def default_prompt_path(backbone: str) -> str:
    """Where the localizer configs read the region prompt: `logs/region_prompt_R50.pth`, `..._R50x4.pth`."""
    name = backbone[len("clip_"):] if backbone.startswith("clip_") else backbone
    return f"logs/region_prompt_{name.replace('RN', 'R', 1)}.pth"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("CORA region prompting", add_help=True)
    p.add_argument("--dataset_file", default="coco", choices=["coco", "lvis"])
    p.add_argument("--coco_path", default="data/coco", type=str)
    p.add_argument("--lvis_path", default="", type=str, help="LVIS: folder with the jsons and train2017/ val2017/")
    p.add_argument("--train_json", default="", type=str,
                   help=f"training boxes (default {TRAIN_JSON} in <coco_path>/annotations, LVIS {LVIS_TRAIN_JSON})")
    p.add_argument("--val_json", default="", type=str,
                   help=f"boxes for the accuracy report (default {OVD_VAL_JSON}, LVIS {LVIS_VAL_JSON})")
    p.add_argument("--backbone", default="clip_RN50", type=str, help="clip_RN50 or clip_RN50x4")
    p.add_argument("--model_path", default="", type=str, help="OpenAI CLIP archive (default ~/.cache/clip/<name>.pt)")
    p.add_argument("--text_len", default=25, type=int, help="context length of the text classifier")
    p.add_argument("--image_scale", default=1.0, type=float, help="multiplies the transforms' image sizes")
    p.add_argument("--lr_prompt", default=1e-4, type=float)
    p.add_argument("--weight_decay", default=1e-4, type=float)
    p.add_argument("--clip_max_norm", default=0.1, type=float)
    p.add_argument("--batch_size", default=4, type=int, help="images per process")
    p.add_argument("--epochs", default=5, type=int)
    p.add_argument("--lr_drop", default=4, type=int, help="StepLR step (epochs), gamma 0.1")
    p.add_argument("--seed", default=42, type=int)
    p.add_argument("--num_workers", default=2, type=int)
    p.add_argument("--output", default="", type=str,
                   help="region prompt file written at the end (default logs/region_prompt_<R50|R50x4>.pth)")
    p.add_argument("--output_dir", default="", type=str,
                   help="checkpoint.pth, log.txt, region_accuracy.json (default: --output without .pth)")
    p.add_argument("--resume", default="", type=str, help="checkpoint to continue from")
    p.add_argument("--no_auto_resume", action="store_true")
    p.add_argument("--eval", action="store_true",
                   help="no training: report the accuracy of --region_prompt_path (default --output) vs CLIP")
    p.add_argument("--region_prompt_path", default="", type=str, help="prompt file evaluated with --eval")
    p.add_argument("--no_eval", action="store_true", help="skip the accuracy report after training")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dist_url", default="env://")
    return p


def _report_accuracy(args, model: RegionClassifier, classifier: TextClassifier, clip_pe: torch.Tensor,
                     device: torch.device, output_dir: Path | None) -> dict[str, Any]:
    dataset_val = build_split(args, "val")
    text_val = text_embeddings(classifier, dataset_val.category_list)
    loader = eval_loader(dataset_val, images_with_boxes(dataset_val), batch_size=args.batch_size,
                         num_workers=args.num_workers)
    variants = {"CLIP (no prompt)": clip_pe, "region prompt": model.positional_embedding.detach().clone()}
    results = region_accuracy(model, loader, dataset_val, text_val, variants, device)
    print(accuracy_table(results), flush=True)
    report = {"val_json": str(dataset_val.ann_file), "categories": len(dataset_val.category_list),
              "text_len": args.text_len, "results": results}
    if output_dir is not None and dist.is_main_process():
        path = output_dir / "region_accuracy.json"
        write_json(report, path, indent=1)
        print(f"accuracy written to {path}", flush=True)
    return report


def main(args) -> dict[str, Any]:
    """Train (or with --eval only evaluate) the region prompt. Returns `{'prompt': file content or None,
    'accuracy': report or None, 'epochs_run': int}`."""
    if not args.output:
        args.output = default_prompt_path(args.backbone)
    output = Path(args.output)
    output_dir = Path(args.output_dir) if args.output_dir else output.with_suffix("")
    device = start_run(args, output_dir)
    if dist.is_main_process():
        output.parent.mkdir(parents=True, exist_ok=True)

    arch, clip_sd = read_clip_archive(resolve_archive_path(args.backbone, args.model_path))
    model = build_region_classifier(arch, clip_sd, trainable_prompt=not args.eval).to(device)
    clip_pe = model.positional_embedding.detach().clone()
    classifier = build_text_classifier(arch, args.text_len, clip_sd).to(device)
    del clip_sd
    result: dict[str, Any] = {"prompt": None, "accuracy": None, "epochs_run": 0}

    if args.eval:
        path = args.region_prompt_path or args.output
        model.load_prompt(load_region_prompt(path, arch), source=path)
        result["prompt"] = model.prompt_state()
        result["accuracy"] = _report_accuracy(args, model, classifier, clip_pe, device, output_dir)
        return result

    dataset_train = build_split(args, "train")
    text_train = text_embeddings(classifier, dataset_train.category_list)
    world, rank = dist.get_world_size(), dist.get_rank()
    # seed = --seed on every process: all of them must agree on the shuffle, set_epoch varies it per epoch
    sampler = DistributedSampler(dataset_train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    batches = BatchSampler(sampler, args.batch_size, drop_last=True)
    if len(batches) == 0:
        raise ValueError(f"--train_json {dataset_train.ann_file}: {len(dataset_train)} images are fewer than one "
                         f"batch ({args.batch_size} per process x {world} processes)")
    loader = DataLoader(dataset_train, batch_sampler=batches, collate_fn=collate_fn, num_workers=args.num_workers)
    optimizer = torch.optim.AdamW([model.positional_embedding], lr=args.lr_prompt, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_drop, gamma=0.1)

    resume = resume_path(args.resume, output_dir, auto=not args.no_auto_resume)
    start_epoch = 0
    if resume:
        checkpoint = load_checkpoint(resume)
        for key in ("model", "optimizer", "lr_scheduler", "epoch"):
            if key not in checkpoint:
                raise ValueError(f"--resume {resume}: not a region-prompt checkpoint (no {key!r}; found "
                                 f"{sorted(map(str, checkpoint))})")
        model.load_prompt(checkpoint["model"], source=f"{resume} ['model']")
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["lr_scheduler"])
        start_epoch = checkpoint["epoch"] + 1
        if "rng_state" in checkpoint:
            set_rng_state(checkpoint["rng_state"])

    print("Start region prompting")
    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        stats = train_one_epoch(model, loader, optimizer, text_train, device, epoch, max_norm=args.clip_max_norm)
        scheduler.step()
        result["epochs_run"] += 1
        if dist.is_main_process():
            save_checkpoint({"model": model.prompt_state(), "optimizer": optimizer.state_dict(),
                             "lr_scheduler": scheduler.state_dict(), "epoch": epoch, "args": args,
                             "rng_state": rng_state()}, output_dir / "checkpoint.pth")
        append_log(output_dir, {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch})
    print(f"Training time {time.strftime('%H:%M:%S', time.gmtime(time.time() - start_time))}")

    result["prompt"] = model.prompt_state()
    if dist.is_main_process():
        save_checkpoint(result["prompt"], output)
        print(f"region prompt written to {output}", flush=True)
    if not args.no_eval:
        result["accuracy"] = _report_accuracy(args, model, classifier, clip_pe, device, output_dir)
    dist.barrier()
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args(), "tools/region_prompt.py"))
