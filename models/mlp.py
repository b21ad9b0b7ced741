"""Small feed-forward network used for box heads, text projection and the DAB position heads."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """`num_layers` Linear layers (`layers.{i}`, the original's state-dict names) with ReLU between them
    and none after the last: input_dim -> hidden_dim -> ... -> hidden_dim -> output_dim."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        in_dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        out_dims = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(in_dims, out_dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `[..., input_dim]` -> `[..., output_dim]`."""
        *hidden, last = self.layers
        for layer in hidden:
            x = F.relu(layer(x))
        return last(x)
