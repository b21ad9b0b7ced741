"""AdamW with the original's parameter groups, and its StepLR schedule (SPEC §5.4)."""
from __future__ import annotations

import torch
from torch import nn


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, lr_drop: int):
    """AdamW over the trainable parameters (weight decay on all of them), StepLR(lr_drop, 0.1) per epoch.

    The original has three groups: the detector (lr), the CLIP trunk (lr_backbone, always frozen
    here, so empty) and `lr_linear_proj_names` (lr x 0.1, empty in every config). The two empty
    groups are kept so that optimizer states of original checkpoints load (group count must match).
    """
    params = [p for name, p in model.named_parameters() if p.requires_grad and "backbone.0" not in name]
    frozen_trunk = [name for name, p in model.named_parameters() if p.requires_grad and "backbone.0" in name]
    if frozen_trunk:
        raise ValueError(f"the CLIP trunk must be frozen, but these parameters require grad: {frozen_trunk[:5]}")
    groups = [
        {"params": params, "lr": lr},
        {"params": [], "lr": 0.0},
        {"params": [], "lr": lr * 0.1},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=lr_drop, gamma=0.1)
    return optimizer, scheduler
