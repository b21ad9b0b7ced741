"""The float32 numerics policy: TF32 (10-bit mantissa matmuls and convolutions on Ampere and later GPUs)
only where it is asked for, never where parity with the original is claimed.

PyTorch's own defaults differ between the two kinds of kernel: matmuls are full fp32, cuDNN
convolutions (CLIP's trunk, `input_proj`, the region head's layer4) use TF32. The original ran in fp32
on V100s (no TF32), so evaluation, the Predictor and every golden comparison run with TF32 off:

* `set_tf32(False)` / `strict_fp32()`: `torch.backends.cuda.matmul.allow_tf32 = False`,
  `torch.backends.cudnn.allow_tf32 = False`, `torch.set_float32_matmul_precision("highest")`.
* `set_tf32(True)`: both on, matmul precision "high" (main.py `--allow_tf32`: training speed only).
* `strict_fp32()` as a context manager or decorator switches TF32 off and restores the previous flags
  on exit; `models.inference.detect` (evaluation, the Predictor, the demos, pseudo-labelling) runs in it.

The flags are process-wide (not per thread); on a CPU they change nothing.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch


class TF32Flags(NamedTuple):
    matmul: bool
    cudnn: bool
    matmul_precision: str  # torch.get_float32_matmul_precision(): 'highest' | 'high' | 'medium'


def tf32_flags() -> TF32Flags:
    """The current TF32 settings."""
    return TF32Flags(torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                     torch.get_float32_matmul_precision())


def restore_tf32(flags: TF32Flags) -> None:
    """Set the flags `tf32_flags()` returned."""
    torch.backends.cuda.matmul.allow_tf32 = flags.matmul
    torch.backends.cudnn.allow_tf32 = flags.cudnn
    torch.set_float32_matmul_precision(flags.matmul_precision)


def set_tf32(enabled: bool) -> TF32Flags:
    """TF32 on (matmuls and cuDNN convolutions, matmul precision 'high') or off (full fp32, 'highest');
    returns the previous flags."""
    previous = tf32_flags()
    restore_tf32(TF32Flags(bool(enabled), bool(enabled), "high" if enabled else "highest"))
    return previous


class strict_fp32(contextlib.ContextDecorator):  # noqa: N801 - used like a function: `with strict_fp32():`
    """TF32 off inside the block (or the decorated function); the previous flags restored on exit."""

    def _recreate_cm(self) -> strict_fp32:  # a fresh instance per call of a decorated function (reentrant)
        return type(self)()

    def __enter__(self) -> strict_fp32:
        self._previous = set_tf32(False)
        return self

    def __exit__(self, *exc) -> None:
        restore_tf32(self._previous)
