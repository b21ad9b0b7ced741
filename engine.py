"""One training epoch and one evaluation pass (SPEC §5.1, §6.1)."""
from __future__ import annotations

import copy
import math
import random
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from models.criterion import class_agnostic_targets
from util import dist
from util.logging import MetricLogger, SmoothedValue


class NonFiniteLossError(RuntimeError):
    """Training stopped: a loss term is inf/nan. The last checkpoint on disk is the last good one."""


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


def _to_device(targets: Sequence[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


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
        samples = samples.to(device)
        targets = _to_device(targets, device)
        split = split_decision(iteration, split_class_p)
        if split:
            targets = [copy.deepcopy(t) for t in targets] + [copy.deepcopy(t) for t in targets]
        outputs = model(samples, categories=categories, split_class=split)
        loss_dict = criterion(outputs, class_agnostic_targets(targets))
        weight_dict = criterion.weight_dict
        losses = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)

        reduced = dist.reduce_dict(loss_dict)
        reduced_scaled = {k: v * weight_dict[k] for k, v in reduced.items() if k in weight_dict}
        reduced_unscaled = {f"{k}_unscaled": v for k, v in reduced.items()}
        loss_value = sum(reduced_scaled.values()).item()
        if not math.isfinite(loss_value):
            bad = {k: v.item() for k, v in reduced.items() if not math.isfinite(v.item())}
            raise NonFiniteLossError(f"epoch {epoch} iteration {iteration}: loss is {loss_value}; "
                                     f"non-finite terms: {bad}. Training stopped; the last checkpoint is intact.")

        optimizer.zero_grad()
        losses.backward()
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        if model_ema is not None:
            model_ema.update(model)

        logger.update(loss=loss_value, **reduced_scaled, **reduced_unscaled)
        logger.update(class_error=reduced.get("class_error", torch.zeros(())).item())
        logger.update(lr=optimizer.param_groups[0]["lr"])
    logger.synchronize_between_processes()
    print("Averaged stats:", logger, flush=True)
    return logger.global_averages()


@torch.no_grad()
def evaluate(model: nn.Module, criterion: nn.Module, postprocessors: dict, data_loader: Iterable, evaluator,
             device: torch.device, *, categories: Sequence[str], novel_indices: Sequence[int] | None = None,
             print_freq: int = 100) -> tuple[dict[str, float], object]:
    """Detections for every val image into `evaluator`; returns the meters' averages with the metric
    summary under `coco_eval_bbox` (COCO OVD: the 16 numbers; LVIS: a dict) and the evaluator.
    The loss is logged as the original does, on class-agnostic targets."""
    model.eval()
    criterion.eval()
    logger = MetricLogger()
    logger.add_meter("class_error", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    if dist.get_world_size() == 1:
        print_freq = min(print_freq, 10)
    for samples, targets in logger.log_every(data_loader, print_freq, "Test:"):
        samples = samples.to(device)
        targets = _to_device(targets, device)
        outputs = model(samples, categories=categories, novel_indices=novel_indices)
        loss_dict = criterion(outputs, class_agnostic_targets(targets))
        weight_dict = criterion.weight_dict
        reduced = dist.reduce_dict(loss_dict)
        reduced_scaled = {k: v * weight_dict[k] for k, v in reduced.items() if k in weight_dict}
        logger.update(loss=sum(reduced_scaled.values()).item(), **reduced_scaled,
                      **{f"{k}_unscaled": v for k, v in reduced.items()})
        orig_sizes = torch.stack([t["orig_size"] for t in targets])
        results = postprocessors["bbox"](outputs, orig_sizes)
        evaluator.update({int(t["image_id"].item()): r for t, r in zip(targets, results)})
    logger.synchronize_between_processes()
    print("Averaged stats:", logger, flush=True)
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    stats = logger.global_averages()
    stats["coco_eval_bbox"] = evaluator.summarize()
    return stats, evaluator
