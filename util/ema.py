"""Exponential moving average of the detector's weights, with the original's semantics (SPEC §5.5)."""
from __future__ import annotations

import copy

import torch
from torch import nn

SKIP_KEYWORDS = ("classifier", "backbone")  # frozen CLIP: never averaged


class ModelEMA:
    """`ema <- decay * ema + (1 - decay) * model` for every state-dict entry whose key contains
    neither 'classifier' nor 'backbone', once per key.

    Keys that alias one tensor (`transformer.decoder.bbox_embed.*` = `bbox_embed.*`) are visited
    once per key, so the shared box heads are averaged twice per step (effective decay d^2),
    exactly as the original's timm ModelEma over `state_dict()` does.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self._passes = self._pair_passes(model)

    def _pair_passes(self, model: nn.Module) -> list[list[str]]:
        """Keys grouped into passes, each tensor at most once per pass (aliases land in later passes)."""
        seen: dict[int, int] = {}
        passes: list[list[str]] = []
        for key, value in self.module.state_dict(keep_vars=True).items():
            if any(word in key for word in SKIP_KEYWORDS) or not value.dtype.is_floating_point:
                continue
            ident = id(value)
            n = seen.get(ident, 0)
            seen[ident] = n + 1
            if n == len(passes):
                passes.append([])
            passes[n].append(key)
        return passes

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        source = _unwrap(model).state_dict(keep_vars=True)
        target = self.module.state_dict(keep_vars=True)
        for keys in self._passes:
            ema = [target[k].data for k in keys]
            new = torch._foreach_mul([source[k].detach() for k in keys], 1.0 - self.decay)
            # same float ops as `ema * decay + (1 - decay) * model`
            torch._foreach_mul_(ema, self.decay)
            torch._foreach_add_(ema, new)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state_dict, strict=True)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
