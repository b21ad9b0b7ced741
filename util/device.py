"""The device a run computes on, checked when the run starts rather than at its first tensor."""
from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None, *, flag: str = "device") -> torch.device:
    """`device` as a torch.device: None or '' = cuda when available, else cpu. A CUDA device this machine
    does not have (no CUDA, or an index beyond the visible GPUs) is a ValueError naming `flag`."""
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{flag} {device!r}: not a device (expected cpu, cuda, cuda:1, ...)") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {device}: CUDA is not available on this machine (use cpu)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{flag} {device}: this machine has {count} visible GPU(s) (cuda:0 .. cuda:{count - 1})")
    return device
