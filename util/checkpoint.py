"""Reading and writing checkpoints in the original's format, safely and atomically.

A checkpoint is `{'model', 'optimizer', 'lr_scheduler', 'epoch', 'args' (argparse.Namespace),
'best_performance', 'model_ema' (a state dict, or -1 without EMA)}` (SPEC §5.6). Files are read with
`torch.load(weights_only=True)`: only tensors, containers, numbers, strings and `argparse.Namespace`
are accepted, so a checkpoint can never run code while it is read.
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from util.atomic import atomic_file

logger = logging.getLogger(__name__)

# Official checkpoints store the run's arguments as an argparse.Namespace under 'args'.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: refused, unreadable, or not fitting the model."""


class LoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device | None = "cpu") -> dict:
    """`torch.load(path, weights_only=True)` with `argparse.Namespace` allowed; the result must be a dict.

    Raises FileNotFoundError naming the path when there is no such file, and CheckpointError when the
    file holds other pickled objects (it could run code) or is not a readable torch checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found (absolute path: {path.absolute()})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    _check_format(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's weights_only unpickler names the refused global; keep its reason, it tells what is inside.
        raise CheckpointError(
            f"checkpoint {path} was not loaded: it contains pickled objects other than tensors, containers, "
            f"numbers, strings and argparse.Namespace, and unpickling them could run code from the file. "
            f"torch says: {weights_only_reason(e)}"
        ) from e
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated, or not a torch.save file): "
                              f"{type(e).__name__}: {_first_lines(str(e))}") from e
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict (model, optimizer, ..., or a state dict), "
                              f"found {type(checkpoint).__name__}")
    return checkpoint


def _check_format(path: Path) -> None:
    """Files that are not torch.save checkpoints, named for what they are: a TorchScript archive (a CLIP
    model such as OpenAI's RN50.pt), or a file that is neither a zip nor a pickle (text, an image, ...)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
            raise CheckpointError(f"checkpoint {path} is a TorchScript archive (a CLIP model such as OpenAI's "
                                  f"RN50.pt?), not a CORA checkpoint: a CLIP archive is given as --model_path")
        return
    # a zip (torch.save's format, here maybe truncated) or a pickle of protocol 2+ (its legacy format)
    if not head.startswith((b"PK", b"\x80")):
        raise CheckpointError(f"checkpoint {path} is not a torch.save file (neither a zip nor a pickle; it starts "
                              f"with {head!r})")


def _first_lines(text: str, limit: int = 600) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # torch bolds part of its message with ANSI escapes
    text = " ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return text if len(text) <= limit else text[:limit] + " ..."


def weights_only_reason(error: BaseException) -> str:
    """The reason in torch's `weights_only` refusal, e.g. `Unsupported global: GLOBAL io.open ...`.

    torch wraps it in paragraphs of advice (including how to allow-list the global, which is exactly what
    must not be done for an untrusted file), so only the unpickler's own sentence is kept.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    marker = "WeightsUnpickler error:"
    if marker in text:
        reason = text.split(marker, 1)[1].strip().splitlines()[0]
        return reason.split(" Please use ", 1)[0].strip()
    found = re.search(r"(Trying to load unsupported GLOBAL \S+[^.]*\.|Unsupported global: GLOBAL \S+)", text)
    if found:
        return found.group(1)
    # never torch's advice to retry with weights_only=False: that is what must not be done with this file
    sentences = [s for s in re.split(r"(?<=\.)\s+", _first_lines(text)) if "weights_only" not in s]
    return " ".join(sentences) or "unsupported pickled object"


def save_checkpoint(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)`, atomically (`util.atomic`): a crash or error mid-write leaves any previous
    file untouched."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save checkpoint {path}: folder {path.parent} does not exist")
    with atomic_file(path) as f:
        torch.save(obj, f)


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and len(value) > 0 and all(torch.is_tensor(v) for v in value.values())


def pick_weights(checkpoint: Mapping, use_ema: bool, *, source: str = "checkpoint") -> Mapping[str, torch.Tensor]:
    """The state dict to load: `model_ema` when `use_ema` and present, else `model`; a bare state dict as is.

    The original writes `model_ema = -1` when EMA was off, so -1 (or no entry) falls back to `model`.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{source}: expected a checkpoint dict, found {type(checkpoint).__name__}")
    if use_ema:
        ema = checkpoint.get("model_ema")
        if isinstance(ema, Mapping):
            return ema
        if "model" in checkpoint:
            logger.info("%s has no EMA weights (model_ema = %r); using 'model'", source, ema)
    model = checkpoint.get("model")
    if isinstance(model, Mapping):
        return model
    if _is_state_dict(checkpoint):
        return checkpoint
    raise CheckpointError(
        f"{source}: no 'model' state dict{' and no model_ema' if use_ema else ''}, and not a bare state dict "
        f"either (top-level keys: {_summary(sorted(map(str, checkpoint)))})"
    )


def _summary(items: list[str], limit: int = 10) -> str:
    """The first `limit` items, then how many there are in all: long key lists stay readable."""
    if not items:
        return "none"
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items)} in all)"


def _by_module(keys: list[str], depth: int = 2) -> str:
    """`backbone.0: 120, transformer.decoder: 30`: shows at a glance when a whole submodule is missing."""
    counts: dict[str, int] = {}
    for key in keys:
        head = ".".join(key.split(".")[:depth])
        counts[head] = counts.get(head, 0) + 1
    return ", ".join(f"{head}: {count}" for head, count in counts.items())


def _alias_groups(model: nn.Module) -> dict[str, list[str]]:
    """key -> every state-dict key of the model that names the same tensor (shared submodules)."""
    by_tensor: dict[int, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(value), []).append(key)
    return {key: names for names in by_tensor.values() if len(names) > 1 for key in names}


def load_model_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True, *,
                     source: str = "checkpoint") -> LoadResult:
    """`model.load_state_dict(state_dict, strict)`, with errors that name the offending keys.

    Shape mismatches are always an error (as in torch). With `strict`, missing and unexpected keys are an
    error listing them (first 10, the count, and a per-module tally); without, they are returned. The model
    registers some modules under two names (`backbone.0.layer4` = `backbone.0.body.layer4`,
    `transformer.decoder.bbox_embed` = `bbox_embed`); its state dict has both, and so do the original's
    checkpoints. A missing key whose alias is present is still missing (as in the original), but the
    message says which alias the file does have.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state_dict and torch.is_tensor(state_dict[k])
                  and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    problems = []
    if mismatched:
        problems.append(f"shape mismatch: {_summary(mismatched)}")
    if strict and missing:
        text = f"missing keys: {_summary(missing)}"
        if len(missing) > 10:
            text += f" [by module: {_by_module(missing)}]"
        aliases = _alias_groups(model)
        covered = [(k, next(a for a in aliases[k] if a in state_dict)) for k in missing
                   if any(a in state_dict for a in aliases.get(k, []))]
        if covered:
            text += (f" ({len(covered)} of them name the same tensor as a key the file has, e.g. "
                     f"{covered[0][0]} = {covered[0][1]}; the model registers that module under two names and "
                     f"its state dict needs both)")
        problems.append(text)
    if strict and unexpected:
        text = f"unexpected keys: {_summary(unexpected)}"
        if len(unexpected) > 10:
            text += f" [by module: {_by_module(unexpected)}]"
        problems.append(text)
    if problems:
        raise CheckpointError(
            f"{source} does not fit the model ({'; '.join(problems)}). Is it a checkpoint of the same backbone and "
            f"flags (--backbone, --num_queries, --enc_layers, --dec_layers, ...)?"
        )
    result = model.load_state_dict(state_dict, strict=strict)
    return LoadResult(list(result.missing_keys), list(result.unexpected_keys))
