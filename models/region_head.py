"""CLIP region classification of boxes (SPEC §3.11, §4).

One piece of code for the three stages that classify regions with CLIP: the detector's eval
scores, region-prompt training and CLIP-aligned labelling. A box is RoI-aligned from layer3 at
2S x 2S, run through CLIP's layer4 (stride 2 -> S x S) and pooled by CLIP's attention pool, whose
positional embedding is the (learned) region prompt.

Two implementations of the same function. The reference (training: the trunk in train mode, and
`models.backbone.reference_eval()`) runs torchvision's RoIAlign, CLIP's layer4 modules and
`models.clip.attention_pool`. The fast one (`RegionHead`, the trunk in eval mode) computes the same
quantities, reordered, as dense matrix products in channels-last (NHWC) layout, with nothing but float
rounding changed (~1e-6 relative on an embedding):

* RoIAlign (aligned, adaptive sampling) is separable: every sample's bilinear weight is a product of a
  y and an x weight, and a sample outside the map is dropped iff its y or its x is out. So a box's
  `2S x 2S` output is `Wy @ map @ Wx^T` per channel (`Wy [2S,H]`, `Wx [2S,W]`: the sample weights of each
  bin, divided by the sample counts), computed on the box's window of the map by two GEMMs (on a CPU;
  elsewhere torchvision's RoIAlign kernel).
* Both are linear, so layer4's first 1x1 convolution (batch norm folded: `W x + b`) commutes with it:
  `W·RoIAlign(layer3) + b = RoIAlign(W·layer3) + b`. Likewise the downsample branch,
  `W_d·avgpool2(RoIAlign(layer3)) + b_d`, is an S x S RoIAlign (the pooled pairs of bins) of `W_d·layer3`.
  The two projected maps are computed once per image, when the image has enough boxes to pay for it.
* The rest of layer4 runs folded (`models.backbone.FoldedTrunk`) in NHWC / channels-last: on a CPU
  through oneDNN with prepacked weights and the ReLU / residual add fused (`_PackedConvs`), elsewhere
  1x1 convolutions as GEMMs on the rows and 3x3 ones by the convolution library.
* The attention pool needs only the mean token's output: per head its scores are `u_h·t_j` with
  `u_h = W_k,h^T q_h` (the `q·b_k` term is the same for every token and cancels in the softmax), and its
  value is `W_v,h (sum_j a_hj t_j) + b_v,h`: two E x E products per box instead of 2(S*S+1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from models.backbone import (
    Backbone,
    FoldedTrunk,
    autocast_dtype,
    fast_eval_enabled,
    folded_trunk,
    valid_sizes,
)
from models.clip import attention_pool
from util.box_ops import box_cxcywh_to_xyxy, inverse_sigmoid
from util.nested_tensor import NestedTensor

REGION_CHUNK = 512  # RoIs per layer4 call on the reference path: bounds memory (RN50: 512 x 1024 x 14 x 14 floats)
FAST_CHUNK = 32  # boxes per layer4 pass on the fast path (chosen by measurement: tools/benchmark.py --sections chunk)


def boxes_to_feature_xyxy(boxes: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """cxcywh boxes normalised to the unpadded image `[B,N,4]` -> xyxy in feature cells of each image's
    valid area (`sizes [B,2]` = (W_valid, H_valid))."""
    xyxy = box_cxcywh_to_xyxy(boxes)
    scale = torch.cat([sizes, sizes], dim=-1)[:, None, :].to(xyxy.dtype)
    return xyxy * scale


def uses_fast_path(trunk: Backbone) -> bool:
    """Whether region embeddings of this trunk take the fast path (eval mode, not `reference_eval()`)."""
    return not trunk.training and fast_eval_enabled()


def region_embeddings(trunk: Backbone, layer3: NestedTensor, boxes: list[torch.Tensor],
                      chunk_size: int = REGION_CHUNK) -> torch.Tensor:
    """L2-normalised CLIP embeddings of boxes.

    layer3: the trunk's stride-16 map `[B,E/2,h,w]` with its mask. boxes: per image `[N_i,4]`
    cxcywh normalised to the unpadded image. Returns `[sum N_i, D]` in the same order.
    """
    if uses_fast_path(trunk):
        head = RegionHead(trunk, layer3)
        out = [head.embed(i, b, expected=len(b)) for i, b in enumerate(boxes)]
        return torch.cat(out) if out else layer3.tensors.new_zeros(0, trunk.attn_pool.c_proj.out_features)
    sizes = valid_sizes(layer3.mask)
    rois = [boxes_to_feature_xyxy(b[None], sizes[i:i + 1])[0] for i, b in enumerate(boxes)]
    grid = trunk.attnpool_grid
    aligned = roi_align(layer3.tensors, rois, output_size=(2 * grid, 2 * grid),
                        spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    if aligned.shape[0] == 0:
        return aligned.new_zeros(0, trunk.attn_pool.c_proj.out_features)
    out = [attention_pool(trunk.attn_pool, trunk.layer4(chunk)) for chunk in aligned.split(chunk_size)]
    return F.normalize(torch.cat(out), dim=-1)


def region_class_probs(region_emb: torch.Tensor, text_features: torch.Tensor, tau: float = 100.0) -> torch.Tensor:
    """`softmax(tau * [cos(region, text_1..C), 0])` without the background column: `[..., D] -> [..., C]`."""
    logits = region_emb @ text_features.t()
    logits = torch.cat([logits, torch.zeros_like(logits[..., :1])], dim=-1)
    return torch.softmax(tau * logits, dim=-1)[..., :-1]


def detection_logits(region_emb: torch.Tensor, text_features: torch.Tensor, objectness: torch.Tensor,
                     tau: float = 100.0) -> torch.Tensor:
    """Eval scores as logits: `inverse_sigmoid(class_prob * sigmoid(objectness))`.

    region_emb `[B,Q,D]`, text_features `[C,D]`, objectness logits `[B,Q,1]` -> `[B,Q,C]`.
    """
    prob = region_class_probs(region_emb, text_features, tau) * objectness.sigmoid()
    return inverse_sigmoid(prob, eps=1e-5)


# --------------------------------------------------------------------------- the fast path


def roi_axis_weights(start: torch.Tensor, end: torch.Tensor, bins: int, length: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One axis of torchvision's RoIAlign (aligned=True, sampling_ratio=-1, spatial_scale=1) as a matrix.

    start / end `[n]` float32: the boxes' coordinates on this axis in feature cells (before the -0.5
    offset). Returns `weights [n, bins, length]` (each bin's bilinear sample weights on this axis, divided
    by its number of samples here; a sample outside [-1, length] weighs nothing) and `window [n, 2]` int
    (first and last-plus-one cell with a weight). The sample positions are computed with torchvision's
    float32 operations in its order.
    """
    n = start.shape[0]
    start = start - 0.5
    extent = (end - 0.5) - start
    bin_size = extent / bins
    grid = torch.ceil(extent / bins).clamp(min=0)  # samples per bin on this axis (non-finite: none)
    grid = torch.where(torch.isfinite(grid), grid, torch.zeros_like(grid))
    most = int(grid.max().item()) if n else 0
    weights = start.new_zeros(n, bins, length)
    window = torch.zeros(n, 2, dtype=torch.int64, device=start.device)
    if most == 0:
        return weights, window
    cell = torch.arange(bins, dtype=start.dtype, device=start.device)
    offset = torch.arange(most, dtype=start.dtype, device=start.device) + 0.5
    pos = (start[:, None, None] + cell[None, :, None] * bin_size[:, None, None]) \
        + offset[None, None, :] * bin_size[:, None, None] / grid[:, None, None].clamp(min=1)
    valid = (offset[None, None, :] < grid[:, None, None]) & (pos >= -1.0) & (pos <= length)
    pos = torch.where(valid, pos.clamp(min=0), torch.zeros_like(pos))
    low = pos.floor()
    last = low >= length - 1
    low = torch.where(last, torch.full_like(low, length - 1), low)
    pos = torch.where(last, low, pos)
    high = torch.where(last, low, low + 1)
    frac = pos - low
    scale = valid.to(start.dtype) / grid[:, None, None].clamp(min=1)
    weights.scatter_add_(2, low.long(), (1.0 - frac) * scale)
    weights.scatter_add_(2, high.long(), frac * scale)
    used = weights.ne(0).any(dim=1)  # [n, length]
    idx = torch.arange(length, device=start.device)
    window[:, 0] = torch.where(used, idx, length).min(dim=1).values
    window[:, 1] = torch.where(used, idx + 1, 0).max(dim=1).values
    window[:, 0] = torch.minimum(window[:, 0], window[:, 1])
    return weights, window


def _roi_separable(feature: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor, win_y: list, win_x: list
                   ) -> torch.Tensor:
    """`feature [H,W,C]` (NHWC of one image), per box `wy [n,R,H]`, `wx [n,R,W]` and windows -> `[n,R,R,C]`:
    `out[k,i,j] = sum_y,x wy[k,i,y] wx[k,j,x] feature[y,x]`, on each box's window only."""
    n, bins = wy.shape[:2]
    channels = feature.shape[-1]
    out = feature.new_zeros(n, bins, bins, channels)
    # One GEMM pair per box on its own window: a batched product would run over the whole map (a 50x75
    # layer3 map costs ~40x the FLOPs of a typical 10x10 window); the loop costs ~20 us per box (CPU only).
    for k in range(n):
        y0, y1 = win_y[k]
        x0, x1 = win_x[k]
        if y1 <= y0 or x1 <= x0:
            continue
        window = feature[y0:y1, x0:x1]  # [h,w,C], row stride W*C: a strided [h, w*C] matrix
        rows = wy[k, :, y0:y1].to(feature.dtype) @ window.flatten(1)  # [R, w*C]
        torch.matmul(wx[k, :, x0:x1].to(feature.dtype), rows.view(bins, x1 - x0, channels), out=out[k])
    return out


def _pool_pairs(weights: torch.Tensor) -> torch.Tensor:
    """Bins (2i, 2i+1) averaged: the axis weights of a 2x2 average pool after RoIAlign."""
    n, bins, length = weights.shape
    return weights.view(n, bins // 2, 2, length).mean(dim=2)


def mean_query_pool(attnpool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`models.clip.attention_pool` of NHWC maps `[N,S,S,E]` -> `[N,D]`, computed per head through the
    keys' and values' projections folded onto the query (module doc); same result up to rounding."""
    n, h, w, e = x.shape
    heads = attnpool.num_heads
    head_dim = e // heads
    dtype = x.dtype
    pe = attnpool.positional_embedding.to(dtype)
    tokens = x.reshape(n, h * w, e)
    mean = tokens.mean(dim=1) + pe[0]  # [N,E]
    tokens = tokens + pe[1:]
    q = F.linear(mean, attnpool.q_proj.weight.to(dtype), attnpool.q_proj.bias.to(dtype)) * head_dim ** -0.5
    wk = attnpool.k_proj.weight.to(dtype).view(heads, head_dim, e)
    u = torch.bmm(q.view(n, heads, head_dim).transpose(0, 1), wk).transpose(0, 1)  # [N,H,E]
    scores = torch.cat([torch.bmm(u, mean[:, :, None]), torch.bmm(u, tokens.transpose(1, 2))], dim=2)  # [N,H,1+SS]
    attn = torch.softmax(scores.float(), dim=-1).to(dtype)
    pooled = torch.baddbmm(attn[:, :, :1] * mean[:, None, :], attn[:, :, 1:], tokens)  # [N,H,E]
    wv = attnpool.v_proj.weight.to(dtype).view(heads, head_dim, e)
    value = torch.bmm(pooled.transpose(0, 1), wv.transpose(1, 2)).transpose(0, 1).reshape(n, e)
    value = value + attnpool.v_proj.bias.to(dtype)
    return F.linear(value, attnpool.c_proj.weight.to(dtype), attnpool.c_proj.bias.to(dtype))


class _Convs:
    """layer4's folded convolutions on NHWC tensors `[n,h,w,C]`: 1x1 ones as GEMMs on the rows, 3x3 ones by
    oneDNN in channels-last (any device: cuDNN on CUDA)."""

    def pointwise(self, x: torch.Tensor, conv: tuple, *, relu: bool, residual: torch.Tensor | None = None):
        out = F.linear(x, conv[0].flatten(1), conv[1])
        if residual is not None:
            out = out.add_(residual)
        return out.relu_() if relu else out

    def conv3x3(self, x: torch.Tensor, conv: tuple) -> torch.Tensor:
        return F.conv2d(x.permute(0, 3, 1, 2), *conv, padding=1).permute(0, 2, 3, 1).relu_()


class _PackedConvs(_Convs):
    """The same on a CPU through oneDNN with the weights reordered once into its blocked layout (the
    convolution otherwise reorders them at every call) and the ReLU / residual add fused into the
    convolution: what torch.compile's CPU backend emits (`torch.ops.mkldnn._convolution_pointwise`).
    Same arithmetic as `_Convs` up to the order of the sums."""

    def __init__(self):
        self.packed: dict[int, torch.Tensor] = {}

    @staticmethod
    def available(device: torch.device) -> bool:
        return (device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
                and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
                and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight"))

    def _weight(self, conv: tuple, x: torch.Tensor, padding: int) -> torch.Tensor:
        key = id(conv[0])
        if key not in self.packed:
            self.packed[key] = torch.ops.mkldnn._reorder_convolution_weight(
                conv[0], [padding, padding], [1, 1], [1, 1], 1, list(x.shape))
        return self.packed[key]

    def _run(self, x: torch.Tensor, conv: tuple, padding: int, relu: bool, residual: torch.Tensor | None):
        x = x.permute(0, 3, 1, 2)  # NHWC memory: a channels-last NCHW tensor
        weight = self._weight(conv, x, padding)
        args = ([padding, padding], [1, 1], [1, 1], 1)
        if residual is None:
            out = torch.ops.mkldnn._convolution_pointwise(x, weight, conv[1], *args, "relu" if relu else "none",
                                                          [], "")
        else:
            out = torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual.permute(0, 3, 1, 2), weight, conv[1], *args, "add", None, "relu" if relu else "none",
                [], "")
        return out.permute(0, 2, 3, 1)

    def pointwise(self, x, conv, *, relu, residual=None):
        return self._run(x, conv, 0, relu, residual)

    def conv3x3(self, x, conv):
        return self._run(x, conv, 1, True, None)


def _avg_pool2(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)


def _packed_convs(folded: FoldedTrunk) -> _PackedConvs:
    """One set of prepacked weights per FoldedTrunk (rebuilt with it when the weights change)."""
    if getattr(folded, "packed_convs", None) is None:
        folded.packed_convs = _PackedConvs()
    return folded.packed_convs


class RegionHead:
    """The fast region head on one batch's layer3 (module doc): `embed(b, boxes)` -> `[n, D]` normalised.

    Per image, the layer3 map in NHWC and, when the image has enough boxes (`expected`), the projections
    of the first layer4 block's 1x1 convolution and downsample onto the whole map are computed once
    and kept for later calls. In an autocast region the GEMMs run in the autocast dtype.
    """

    def __init__(self, trunk: Backbone, layer3: NestedTensor, *, chunk_size: int = FAST_CHUNK,
                 separable: bool | None = None):
        self.trunk = trunk
        self.layer3 = layer3
        self.dtype = autocast_dtype(layer3.tensors) or layer3.tensors.dtype
        self.folded: FoldedTrunk = folded_trunk(trunk, self.dtype)
        self.blocks = self.folded.layers[3]
        self.sizes = valid_sizes(layer3.mask)
        self.grid = trunk.attnpool_grid
        self.chunk_size = chunk_size
        self._maps: dict[int, dict[str, torch.Tensor]] = {}
        self.convs = _packed_convs(self.folded) if _PackedConvs.available(layer3.tensors.device) else _Convs()
        # RoIAlign: separable GEMMs on a CPU, torchvision's kernel elsewhere (same function, module doc)
        self.separable = layer3.tensors.device.type == "cpu" if separable is None else separable

    def _image(self, b: int, expected: int) -> dict[str, torch.Tensor]:
        if b not in self._maps:
            feature = self.layer3.tensors[b].to(self.dtype).permute(1, 2, 0).contiguous()  # [H,W,C]
            maps = {"layer3": feature}
            pixels = feature.shape[0] * feature.shape[1]
            first = self.blocks[0]
            # per box the 1x1 conv runs on (2S)^2 cells and the downsample on S^2; on the map, on H*W
            if expected * (2 * self.grid) ** 2 >= pixels:
                maps["conv1"] = F.linear(feature, first.conv1[0].flatten(1))
            if first.down is not None and expected * self.grid ** 2 >= pixels:
                maps["down"] = F.linear(feature, first.down[0].flatten(1))
            self._maps[b] = maps
        return self._maps[b]

    def embed(self, b: int, boxes: torch.Tensor, *, expected: int | None = None) -> torch.Tensor:
        """boxes `[n,4]` cxcywh normalised to image b's unpadded area -> `[n, D]` L2-normalised (float32).
        expected: how many boxes of this image will be embedded in all (decides the map projections;
        the same value gives the same numbers)."""
        n = boxes.shape[0]
        if n == 0:
            return boxes.new_zeros(0, self.trunk.attn_pool.c_proj.out_features)
        maps = self._image(b, n if expected is None else expected)
        height, width = maps["layer3"].shape[:2]
        xyxy = boxes_to_feature_xyxy(boxes[None].float(), self.sizes[b:b + 1])[0]
        bins = 2 * self.grid
        if self.separable:
            wy, win_y = roi_axis_weights(xyxy[:, 1], xyxy[:, 3], bins, height)
            wx, win_x = roi_axis_weights(xyxy[:, 0], xyxy[:, 2], bins, width)
        out = []
        for start in range(0, n, self.chunk_size):
            part = slice(start, min(start + self.chunk_size, n))
            if self.separable:
                sampler = _SeparableRoIs(wy[part], wx[part], win_y[part].tolist(), win_x[part].tolist())
            else:
                sampler = _TorchvisionRoIs(xyxy[part], bins)
            out.append(self._layer4_pool(maps, sampler))
        return F.normalize(torch.cat(out).float(), dim=-1)

    def _layer4_pool(self, maps: dict, rois: _SeparableRoIs | _TorchvisionRoIs) -> torch.Tensor:
        convs = self.convs
        first, rest = self.blocks[0], self.blocks[1:]
        if "conv1" in maps:
            x = rois(maps["conv1"]).add_(first.conv1[1]).relu_()
        else:
            aligned = rois(maps["layer3"])
            x = convs.pointwise(aligned, first.conv1, relu=True)
        x = convs.conv3x3(x, first.conv2)
        if first.stride > 1:
            x = _avg_pool2(x)
        if first.down is None:
            identity = rois(maps["layer3"])
        elif "down" in maps:
            identity = rois(maps["down"], pooled=True).add_(first.down[1])
        else:
            if "conv1" in maps:
                aligned = rois(maps["layer3"])
            identity = convs.pointwise(_avg_pool2(aligned).contiguous(), first.down, relu=False)
        x = convs.pointwise(x.contiguous(), first.conv3, relu=True, residual=identity)
        for block in rest:
            y = convs.pointwise(x, block.conv1, relu=True)
            y = convs.conv3x3(y, block.conv2)
            x = convs.pointwise(y, block.conv3, relu=True, residual=x)
        return mean_query_pool(self.trunk.attn_pool, x)


class _SeparableRoIs:
    """RoIAlign of one chunk's boxes on NHWC maps `[H,W,C]` -> `[n,2S,2S,C]` (pooled: the 2x2 average, `[n,S,S,C]`),
    as windowed GEMMs (module doc; the CPU's way)."""

    def __init__(self, wy: torch.Tensor, wx: torch.Tensor, win_y: list, win_x: list):
        self.wy, self.wx, self.win_y, self.win_x = wy, wx, win_y, win_x

    def __call__(self, feature: torch.Tensor, *, pooled: bool = False) -> torch.Tensor:
        wy, wx = (_pool_pairs(self.wy), _pool_pairs(self.wx)) if pooled else (self.wy, self.wx)
        return _roi_separable(feature, wy, wx, self.win_y, self.win_x)


class _TorchvisionRoIs:
    """The same through torchvision's RoIAlign kernel (CUDA: one launch per map instead of a GEMM pair per box)."""

    def __init__(self, xyxy: torch.Tensor, bins: int):
        self.xyxy, self.bins = xyxy, bins

    def __call__(self, feature: torch.Tensor, *, pooled: bool = False) -> torch.Tensor:
        nchw = feature.permute(2, 0, 1)[None].float()
        out = roi_align(nchw, [self.xyxy.to(nchw.dtype)], output_size=(self.bins, self.bins), spatial_scale=1.0,
                        sampling_ratio=-1, aligned=True)
        if pooled:
            out = F.avg_pool2d(out, 2)
        return out.to(feature.dtype).permute(0, 2, 3, 1).contiguous()
