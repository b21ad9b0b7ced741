"""Reading and writing checkpoints in the original's format, safely and atomically.

A checkpoint is `{'model', 'optimizer', 'lr_scheduler', 'epoch', 'args' (argparse.Namespace),
'best_performance', 'model_ema'}` (SPEC §5.6). Files are read with `weights_only=True`: only
tensors, containers, numbers and `argparse.Namespace` are accepted, never code.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

SAFE_GLOBALS = [argparse.Namespace]


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(
            f"checkpoint {path} was not loaded: it holds objects other than tensors, containers and "
            f"argparse.Namespace, which could run code when unpickled ({type(e).__name__}: {str(e)[:400]})"
        ) from e
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {path}: expected a dict, found {type(checkpoint).__name__}")
    return checkpoint


def pick_weights(checkpoint: dict, *, use_ema: bool, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict to use: `model_ema` when asked for and present, else `model`; a bare state dict as is."""
    if use_ema and isinstance(checkpoint.get("model_ema"), dict):
        return checkpoint["model_ema"]
    if isinstance(checkpoint.get("model"), dict):
        return checkpoint["model"]
    if checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
        return checkpoint
    raise ValueError(f"{source}: no 'model' state dict (keys: {sorted(checkpoint)[:10]})")


def _summary(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}{f', ... ({len(keys)} in all)' if len(keys) > limit else ''}"


def load_model_state(model: nn.Module, state_dict: dict[str, torch.Tensor], *, strict: bool = True,
                     source: str = "checkpoint"):
    """`model.load_state_dict` with missing/unexpected keys and shape mismatches named in the error."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch: {_summary(mismatched)}")
    if strict and missing:
        problems.append(f"missing keys: {_summary(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {_summary(unexpected)}")
    if problems:
        raise ValueError(f"{source} does not fit the model ({'; '.join(problems)}). Is it a checkpoint of "
                         f"the same backbone and flags (--backbone, --num_queries, --enc_layers, ...)?")
    return model.load_state_dict(state_dict, strict=strict)


def save_checkpoint(obj: dict, path: str | os.PathLike) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename: a crash leaves the old file intact."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
