"""One training epoch and one evaluation pass (SPEC §5.1, §6.1)."""
from __future__ import annotations

import copy
import random
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from datasets.pseudo_boxes import PSEUDO_LABEL
from models.criterion import class_agnostic_targets
from models.inference import detect
from models.prematch import NovelBoost
from util import dist
from util.logging import MetricLogger, SmoothedValue
from util.run import check_finite, to_device


def split_decision(iteration: int, p: float) -> bool:
    """Whether iteration `iteration` of every epoch is a split-class one, identically on every rank.

    The original seeds Python's `random` with the iteration index (saving and restoring the
    global state) and compares one draw with p.
    """
    state = random.getstate()
    random.seed(iteration)
    draw = random.random()
    random.setstate(state)
    return draw < p


def with_pseudo_categories(categories: Sequence[str], targets: Sequence[dict]) -> tuple[list[str], list[dict]]:
    """CORA+ (SPEC §2.2): the pseudo-box class names of the batch are appended to the category list and
    each pseudo box (dataset label `PSEUDO_LABEL`, name in the target's `pseudo_labels`, in box order)
    is labelled `len(categories) + position of its name`. A batch without pseudo boxes is returned as is.

    The names are appended in sorted order; the original appends them in Python `set` order, which
    changes with the interpreter's hash seed (per process and per run). Only the class indices differ:
    a model's outputs for a name are the same wherever the name sits in the list.
    """
    names = sorted({name for t in targets for name in t.get("pseudo_labels", ())})
    if not names:
        return list(categories), list(targets)
    position = {name: len(categories) + i for i, name in enumerate(names)}
    relabelled = []
    for t in targets:
        pseudo = list(t.get("pseudo_labels", ()))
        placeholder = t["labels"] == PSEUDO_LABEL
        if int(placeholder.sum()) != len(pseudo):
            raise ValueError(f"image {t.get('image_id')}: {int(placeholder.sum())} pseudo boxes but "
                             f"{len(pseudo)} pseudo_labels")
        labels = t["labels"].clone()
        labels[placeholder] = torch.as_tensor([position[n] for n in pseudo], dtype=labels.dtype).to(labels.device)
        relabelled.append({**t, "labels": labels})
    return [*categories, *names], relabelled


def train_one_epoch(model: nn.Module, criterion: nn.Module, data_loader: Iterable, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int, *, categories: Sequence[str], max_norm: float = 0.1,
                    model_ema=None, split_class_p: float = 0.0, print_freq: int = 100) -> dict[str, float]:
    """Class-agnostic training of the localizer for one epoch; returns the global averages of the meters."""
    model.train()
    criterion.train()
    logger = MetricLogger()
    logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    logger.add_meter("class_error", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    if dist.get_world_size() == 1:
        print_freq = min(print_freq, 10)
    for iteration, (samples, targets) in enumerate(logger.log_every(data_loader, print_freq, f"Epoch: [{epoch}]")):
        samples = samples.to(device, non_blocking=True)
        used_categories, targets = with_pseudo_categories(categories, to_device(targets, device))
        split = split_decision(iteration, split_class_p)
        if split:
            targets = [copy.deepcopy(t) for t in targets] + [copy.deepcopy(t) for t in targets]
        outputs = model(samples, used_categories, split_class=split)
        loss_dict = criterion(outputs, class_agnostic_targets(targets))
        weight_dict = criterion.weight_dict
        losses = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)

        reduced = dist.reduce_dict(loss_dict)
        reduced_scaled = {k: v * weight_dict[k] for k, v in reduced.items() if k in weight_dict}
        reduced_unscaled = {f"{k}_unscaled": v for k, v in reduced.items()}
        # every meter's value in one copy to the host (one sync, not one per meter); float64 holds each exactly
        meters = {"loss": sum(reduced_scaled.values()), **reduced_scaled, **reduced_unscaled}
        meters = dict(zip(meters, torch.stack([v.detach().reshape(()).double() for v in meters.values()]).tolist()))
        loss_value = meters["loss"]
        check_finite(loss_value, reduced, where=f"epoch {epoch} iteration {iteration}")

        optimizer.zero_grad()
        losses.backward()
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        if model_ema is not None:
            model_ema.update(model)

        logger.update(**meters)
        logger.update(class_error=meters.get("class_error_unscaled", 0.0))
        logger.update(lr=optimizer.param_groups[0]["lr"])
    logger.synchronize_between_processes()
    print("Averaged stats:", logger, flush=True)
    return logger.global_averages()


@torch.no_grad()
def evaluate(model: nn.Module, criterion: nn.Module, postprocessors: dict, data_loader: Iterable, evaluator,
             device: torch.device, *, categories: Sequence[str], boost: NovelBoost | None = None, prune: bool = True,
             print_freq: int = 100) -> tuple[dict[str, float], object]:
    """Detections for every val image (`models.inference.detect`) into `evaluator`; returns the meters'
    averages with the metric summary under `coco_eval_bbox` (COCO OVD: the 16 numbers; LVIS: a dict)
    and the evaluator.

    The logged losses are the training losses on the val set (class-agnostic targets, objectness
    logits). The original logs the same criterion on its 65-class eval scores, where the objectness
    "class" is read from class 0's score, a number without meaning.
    """
    model.eval()
    criterion.eval()
    logger = MetricLogger()
    logger.add_meter("class_error", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    if dist.get_world_size() == 1:
        print_freq = min(print_freq, 10)
    for samples, targets in logger.log_every(data_loader, print_freq, "Test:"):
        samples = samples.to(device, non_blocking=True)
        targets = to_device(targets, device)
        orig_sizes = torch.stack([t["orig_size"] for t in targets])
        detected = detect(model, samples, categories, postprocess=postprocessors["bbox"], target_sizes=orig_sizes,
                          boost=boost, prune=prune)
        loss_dict = criterion(detected.outputs, class_agnostic_targets(targets))
        weight_dict = criterion.weight_dict
        reduced = dist.reduce_dict(loss_dict)
        reduced_scaled = {k: v * weight_dict[k] for k, v in reduced.items() if k in weight_dict}
        meters = {"loss": sum(reduced_scaled.values()), **reduced_scaled,
                  **{f"{k}_unscaled": v for k, v in reduced.items()}}
        # every meter's value in one copy to the host (one sync, not one per meter); float64 holds each exactly
        logger.update(**dict(zip(meters, torch.stack([v.detach().reshape(()).double() for v in meters.values()])
                                 .tolist())))
        evaluator.update({int(t["image_id"].item()): r for t, r in zip(targets, detected.results)})
    logger.synchronize_between_processes()
    print("Averaged stats:", logger, flush=True)
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    stats = logger.global_averages()
    stats["coco_eval_bbox"] = evaluator.summarize()
    return stats, evaluator
