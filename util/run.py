"""The scaffold every training stage runs in (main.py's localizer, tools/region_prompt.py).

    device = start_run(args, output_dir)          # device checked, process group, seeds, run_<time>.json
    resume = resume_path(args.resume, output_dir, auto=not args.no_auto_resume)
    ...  save_checkpoint(state, output_dir / "checkpoint.pth")   # util.checkpoint, atomic
    append_log(output_dir, {"epoch": epoch, ...})                # log.txt, one JSON object per line

Distributed mode comes from the environment (torchrun or slurm, `util.dist`); every process seeds
`args.seed + rank`; only rank 0 writes files.
"""
from __future__ import annotations

import json
import math
import random
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from util import dist
from util.device import resolve_device
from util.run_info import write_run_info


class NonFiniteLossError(RuntimeError):
    """Training stopped: a loss is inf or nan. The last checkpoint on disk is the last good one."""


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's generators (CUDA's included) from one seed."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def start_run(args: Any, output_dir: Path | None) -> torch.device:
    """Check `args.device`, join the process group, print the arguments, seed with `args.seed + rank`,
    and (rank 0) create `output_dir` with a `run_<timestamp>.json` (arguments, command line, git SHA)."""
    device = resolve_device(args.device, flag="--device")
    dist.init_distributed_mode(args)
    print(args)
    seed_everything(args.seed + dist.get_rank())
    if output_dir is not None and dist.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        write_run_info(str(output_dir), args)
    return device


def resume_path(resume: str, output_dir: Path | None, *, auto: bool) -> str:
    """`resume` when given; else, with `auto`, the run's own `<output_dir>/checkpoint.pth` if it exists."""
    if resume:
        return resume
    if auto and output_dir is not None and (output_dir / "checkpoint.pth").exists():
        path = str(output_dir / "checkpoint.pth")
        print(f"auto-resume from {path}")
        return path
    return ""


def append_log(output_dir: Path | None, record: Mapping[str, Any]) -> None:
    """One JSON line in `<output_dir>/log.txt` (rank 0; nothing without an output folder)."""
    if output_dir is None or not dist.is_main_process():
        return
    with (output_dir / "log.txt").open("a") as f:
        f.write(json.dumps(record) + "\n")


def logged_epochs(output_dir: Path | None) -> set[int]:
    """The epochs `<output_dir>/log.txt` has a line for (lines of --eval runs have none)."""
    if output_dir is None or not (output_dir / "log.txt").is_file():
        return set()
    records = [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines() if line.strip()]
    return {int(r["epoch"]) for r in records if "epoch" in r}


def to_device(targets: Sequence[dict], device: torch.device) -> list[dict]:
    """Each target's tensors on `device` (non-blocking: pinned host memory copies asynchronously);
    other values (names, lists) as they are."""
    return [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
            for t in targets]


def run_cli(main, args: Any, name: str) -> int:
    """`main(args)` for a command line: errors a user can fix (files, flags, checkpoints, a diverged loss)
    as one line `<name>: error: ...` on stderr and exit status 1, not a traceback."""
    try:
        main(args)
    except (FileNotFoundError, ValueError, NonFiniteLossError) as e:
        print(f"{name}: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


def check_finite(loss_value: float, terms: Mapping[str, torch.Tensor], *, where: str) -> None:
    """Raise NonFiniteLossError naming the non-finite terms when `loss_value` is inf or nan."""
    if math.isfinite(loss_value):
        return
    bad = {k: float(v) for k, v in terms.items() if not math.isfinite(float(v))}
    raise NonFiniteLossError(f"{where}: loss is {loss_value}; non-finite terms: {bad}. "
                             f"Training stopped; the last checkpoint is intact.")
