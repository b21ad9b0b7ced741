"""The frozen CLIP trunk as the detector sees it: layer3 / layer4 maps with masks, and sine positions."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

from util.nested_tensor import NestedTensor


class PositionEmbeddingSine(nn.Module):
    """Sine positions of a padded map: `mask [B,h,w]` (True = padding) -> `[B, 2*num_pos_feats, h, w]`.

    The Deformable-DETR variant: positions are `cumsum - 0.5` normalised by `(last + 1e-6 + 0.5)`,
    times 2*pi; channel pairs share a frequency `temperature ** (2*floor(k/2) / num_pos_feats)`;
    output is `cat(pos_y, pos_x)`.
    """

    def __init__(self, *, num_pos_feats: int = 128, temperature: float = 20.0):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = 2 * math.pi

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        not_mask = (~mask).float()
        y_embed = not_mask.cumsum(1) - 0.5
        x_embed = not_mask.cumsum(2) - 0.5
        # `(last + eps) + 0.5`, in this order: on padded rows/columns `last` is -0.5 and the huge
        # quotient's sine depends on how the denominator rounds.
        eps = 1e-6
        y_embed = y_embed / (y_embed[:, -1:, :] + eps + 0.5) * self.scale
        x_embed = x_embed / (x_embed[:, :, -1:] + eps + 0.5) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class Backbone(nn.Module):
    """CLIP ModifiedResNet trunk returning layer3 (stride 16) and layer4 (stride 32).

    `attn_pool` and `layer4` are the CLIP modules themselves (shared with `body`), used by
    pre-matching and region scoring; so `backbone.0.layer4.*` aliases `backbone.0.body.layer4.*`
    in the state dict, as in the original's checkpoints.
    """

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.body = IntermediateLayerGetter(visual, return_layers={"layer3": "layer3", "layer4": "layer4"})
        self.attn_pool = visual.attnpool
        self.layer4 = visual.layer4
        self.num_channels = [visual.layer3[-1].conv3.out_channels, visual.layer4[-1].conv3.out_channels]

    @property
    def attnpool_grid(self) -> int:
        """S: the attention pool's positional embedding has S*S + 1 rows."""
        return round(math.sqrt(self.attn_pool.positional_embedding.shape[0] - 1))

    def forward(self, samples: NestedTensor) -> dict[str, NestedTensor]:
        """`[B,3,H,W]` + mask -> {'layer3': `[B,E/2,H/16,W/16]`, 'layer4': `[B,E,H/32,W/32]`} with masks."""
        # The trunk is frozen: no activations are kept for backward.
        with torch.no_grad():
            maps = self.body(samples.tensors)
        out = {}
        for name, x in maps.items():
            mask = F.interpolate(samples.mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
            out[name] = NestedTensor(x, mask)
        return out


class Joiner(nn.Sequential):
    """`backbone.0` = the trunk, `backbone.1` = the position encoding (no weights)."""

    def __init__(self, backbone: Backbone, position_embedding: PositionEmbeddingSine):
        super().__init__(backbone, position_embedding)

    @property
    def trunk(self) -> Backbone:
        return self[0]

    def forward(self, samples: NestedTensor) -> tuple[dict[str, NestedTensor], torch.Tensor]:
        """Returns the feature maps and the sine positions of layer3 `[B,256,h,w]` (the transformer's input)."""
        features = self[0](samples)
        pos = self[1](features["layer3"].mask).to(features["layer3"].tensors.dtype)
        return features, pos


def valid_sizes(mask: torch.Tensor) -> torch.Tensor:
    """Per image `(W_valid, H_valid)` of a feature map from its padding mask `[B,h,w]` -> `[B,2]` float.

    Counted on row 0 / column 0, as the original does: the nearest-downsampled mask decides.
    """
    return torch.stack([(~mask[:, 0, :]).sum(-1), (~mask[:, :, 0]).sum(-1)], dim=-1).float()


def build_backbone(visual: nn.Module, *, pe_temperature: float = 20.0, hidden_dim: int = 256) -> Joiner:
    return Joiner(Backbone(visual), PositionEmbeddingSine(num_pos_feats=hidden_dim // 2, temperature=pe_temperature))
