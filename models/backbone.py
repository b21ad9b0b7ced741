"""The frozen CLIP trunk as the detector sees it: layer3 / layer4 maps with masks, and sine positions.

At evaluation (`Backbone` in eval mode) the trunk runs as `FoldedTrunk`: an inference copy in which
every FrozenBatchNorm2d is folded into the convolution before it. It is not a module and never part of
a state dict (checkpoints keep the original's keys); `folded_trunk(backbone)` keeps one per Backbone and
rebuilds it when a source tensor changes. Folding changes float rounding only (~1e-6 relative on the
maps). Training keeps the unfolded modules (`Backbone` in train mode), and `reference_eval()` restores
the pre-folding evaluation path everywhere (the benchmark's reference, tests).
"""
from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

from util.nested_tensor import NestedTensor

_FAST_EVAL = True


def fast_eval_enabled() -> bool:
    """Whether evaluation uses the fast exact path (folded trunk, `models.region_head`'s GEMM region
    head, `models.pruned_eval`'s planned schedule); False inside `reference_eval()`."""
    return _FAST_EVAL


@contextlib.contextmanager
def reference_eval() -> Iterator[None]:
    """Evaluate as this project did before the fast path (issue 19): unfolded trunk, torchvision's
    RoIAlign, CLIP's layer4 modules and attention pool, the 50 x 1.25^n chunk schedule with a full
    PostProcess at every check. Same detections up to float rounding; for benchmarks and tests."""
    global _FAST_EVAL
    previous, _FAST_EVAL = _FAST_EVAL, False
    try:
        yield
    finally:
        _FAST_EVAL = previous


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


def _fold(conv: nn.Conv2d, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A bias-free convolution followed by a FrozenBatchNorm2d as one convolution `(weight, bias)`:
    `w * s`, `beta - mean * s` with `s = gamma / sqrt(var + eps)`, computed in float64."""
    scale = bn.weight.double() * (bn.running_var.double() + bn.eps).rsqrt()
    weight = conv.weight.double() * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
    bias = bn.bias.double() - bn.running_mean.double() * scale
    return weight.to(conv.weight.dtype).contiguous(), bias.to(conv.weight.dtype)


class FoldedBlock:
    """One ModifiedResNet Bottleneck with its batch norms folded: `conv1` (1x1) + ReLU, `conv2` (3x3) +
    ReLU, avg-pool(stride), `conv3` (1x1), plus the identity or `down` (avg-pool(stride), 1x1), ReLU.
    Each conv is `(weight [Cout,Cin,k,k], bias [Cout])`."""

    __slots__ = ("conv1", "conv2", "conv3", "down", "stride")

    def __init__(self, block: nn.Module):
        self.conv1 = _fold(block.conv1, block.bn1)
        self.conv2 = _fold(block.conv2, block.bn2)
        self.conv3 = _fold(block.conv3, block.bn3)
        self.down = _fold(block.downsample[1], block.downsample[2]) if block.downsample is not None else None
        self.stride = block.stride

    def cast(self, dtype: torch.dtype) -> FoldedBlock:
        out = object.__new__(FoldedBlock)
        for name in ("conv1", "conv2", "conv3", "down"):
            conv = getattr(self, name)
            setattr(out, name, None if conv is None else tuple(t.to(dtype) for t in conv))
        out.stride = self.stride
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """`[N,Cin,H,W]` (any memory format) -> `[N,4P,H/stride,W/stride]`."""
        out = F.conv2d(x, *self.conv1).relu_()
        out = F.conv2d(out, *self.conv2, padding=1).relu_()
        if self.stride > 1:
            out = F.avg_pool2d(out, self.stride)
        out = F.conv2d(out, *self.conv3)
        identity = x if self.down is None else F.conv2d(F.avg_pool2d(x, self.stride), *self.down)
        return out.add_(identity).relu_()


class FoldedTrunk:
    """Inference copy of a frozen CLIP ModifiedResNet (stem, layer1..layer4) with every batch norm folded
    into its convolution. Not a module: nothing of it is in a state dict. Built by `folded_trunk`.

    `stem` holds the three stem convolutions `(weight, bias)` (stride 2, 1, 1; each + ReLU, then a 2x2
    average pool); `layers[i]` the FoldedBlocks of layer i+1. The image trunk runs channels-last
    (oneDNN's preferred layout for these convolutions on a CPU).
    """

    def __init__(self, visual_body: nn.Module):
        self.stem = [_fold(getattr(visual_body, f"conv{i}"), getattr(visual_body, f"bn{i}")) for i in (1, 2, 3)]
        self.layers = [[FoldedBlock(block) for block in getattr(visual_body, f"layer{i}")] for i in (1, 2, 3, 4)]

    @property
    def dtype(self) -> torch.dtype:
        return self.stem[0][0].dtype

    def cast(self, dtype: torch.dtype) -> FoldedTrunk:
        out = object.__new__(FoldedTrunk)
        out.stem = [tuple(t.to(dtype) for t in conv) for conv in self.stem]
        out.layers = [[block.cast(dtype) for block in layer] for layer in self.layers]
        return out

    def forward_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """`[B,3,H,W]` -> {'layer3': `[B,E/2,H/16,W/16]`, 'layer4': `[B,E,H/32,W/32]`}, contiguous NCHW, in
        the input's dtype (computed channels-last)."""
        x = images.to(self.dtype).contiguous(memory_format=torch.channels_last)
        for i, conv in enumerate(self.stem):
            x = F.conv2d(x, *conv, stride=2 if i == 0 else 1, padding=1).relu_()
        x = F.avg_pool2d(x, 2)
        maps = {}
        for i, layer in enumerate(self.layers, start=1):
            for block in layer:
                x = block(x)
            if i >= 3:
                maps[f"layer{i}"] = x
        return {name: m.to(images.dtype).contiguous() for name, m in maps.items()}


_FOLDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Backbone -> (key, {dtype: FoldedTrunk})


def _source_tensors(backbone: Backbone) -> list[torch.Tensor]:
    """Every tensor the fold reads: stem and layer1..4 convolution weights and batch-norm buffers."""
    return [t for name, module in backbone.body.named_children() if name != "avgpool"
            for t in list(module.parameters()) + list(module.buffers())]


def _source_key(tensors: list[torch.Tensor]) -> tuple:
    # storage address + in-place version counter of each tensor: `load_state_dict` (copy_), `.to()` (new
    # storage) and in-place edits of the tensors themselves change it; edits through `.data` do not
    # (call `invalidate_folded_trunk`).
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)


def folded_trunk(backbone: Backbone, dtype: torch.dtype | None = None) -> FoldedTrunk:
    """The backbone's FoldedTrunk (in `dtype`, default the weights'), cached and rebuilt when a source
    tensor has changed since it was folded."""
    tensors = _source_tensors(backbone)
    key = _source_key(tensors)
    entry = _FOLDED.get(backbone)
    if entry is None or entry[0] != key:
        with torch.no_grad():
            entry = (key, {tensors[0].dtype: FoldedTrunk(backbone.body)})
        _FOLDED[backbone] = entry
    folds = entry[1]
    dtype = dtype or tensors[0].dtype
    if dtype not in folds:
        folds[dtype] = next(iter(folds.values())).cast(dtype)
    return folds[dtype]


def invalidate_folded_trunk(backbone: Backbone) -> None:
    """Drop the cached FoldedTrunk (after editing trunk weights through `.data`)."""
    _FOLDED.pop(backbone, None)


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
        # The trunk is frozen: no activations are kept for backward. At evaluation: the folded copy.
        with torch.no_grad():
            if self.training or not fast_eval_enabled():
                maps = self.body(samples.tensors)
            else:
                maps = folded_trunk(self, autocast_dtype(samples.tensors)).forward_maps(samples.tensors)
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


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The reduced precision an enabled autocast asks for on x's device (None: the weights' dtype)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def valid_sizes(mask: torch.Tensor) -> torch.Tensor:
    """Per image `(W_valid, H_valid)` of a feature map from its padding mask `[B,h,w]` -> `[B,2]` float.

    Counted on row 0 / column 0, as the original does: the nearest-downsampled mask decides.
    """
    return torch.stack([(~mask[:, 0, :]).sum(-1), (~mask[:, :, 0]).sum(-1)], dim=-1).float()


def build_backbone(visual: nn.Module, *, pe_temperature: float = 20.0, hidden_dim: int = 256) -> Joiner:
    return Joiner(Backbone(visual), PositionEmbeddingSine(num_pos_feats=hidden_dim // 2, temperature=pe_temperature))
