"""Anchor pre-matching (SPEC §3.6): classify every learned anchor with CLIP before the decoder.

Each anchor box is pooled from the layer4 map by a cheap variant of CLIP's attention pool,
compared with the text embeddings of the categories, and given its arg-max class. Anchors are
then reordered per image so that anchors of one class are contiguous, and each anchor's decoder
content query becomes the projected text embedding of its class.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from models.backbone import fast_eval_enabled, valid_sizes
from models.clip import multi_head_pool
from models.region_head import boxes_to_feature_xyxy, roi_axis_weights
from util.nested_tensor import NestedTensor

PREMATCH_TAU = 100.0  # softmax temperature, hard-coded in the original
BACKGROUND_LOGIT = -1.0  # constant background similarity; its column is dropped after the softmax
PREMATCH_CHUNK = 256  # RoIs per pooling call: bounds memory (RN50: 256 x 3 x 2048 x 7 x 7 floats)


@dataclass(frozen=True)
class NovelBoost:
    """The eval-time novel boost (`--target_class_factor`, SPEC §3.6): pre-matching multiplies the
    class probabilities of `indices` (into the category list) by `factor` before the arg-max."""

    factor: float
    indices: tuple[int, ...]


def resolve_boost(factor: float, novel_indices: Sequence[int] | None, num_classes: int, *,
                  what: str = "the category list") -> NovelBoost | None:
    """The boost for a vocabulary of `num_classes` names whose novel (LVIS: rare) classes are
    `novel_indices`: None when `factor` is 1. The original asserts unless the list is COCO-OVD's 65
    names or LVIS's 1203; here any list with known novel classes works, and one without is refused."""
    if factor == 1.0:
        return None
    if not factor > 0:
        raise ValueError(f"target_class_factor {factor}: must be positive")
    if not novel_indices:
        raise ValueError(
            f"target_class_factor {factor} boosts the novel classes of the vocabulary (COCO OVD's 17, LVIS's rare "
            f"ones, a json's categories marked \"split\": \"novel\"), but {what} ({num_classes} names) has none "
            f"known; use target_class_factor 1 for this vocabulary"
        )
    indices = tuple(int(i) for i in novel_indices)
    bad = [i for i in indices if not 0 <= i < num_classes]
    if bad:
        raise ValueError(f"novel indices {bad[:10]} are not indices into {what} ({num_classes} names)")
    return NovelBoost(float(factor), indices)


@dataclass
class PrematchResult:
    classes: torch.Tensor | None  # [B',Q] pre-matched class per output query (sorted ascending); None: no pre-matching
    anchor_index: torch.Tensor  # [B',Q] row of query_embed each output query came from
    refpoints: torch.Tensor  # [Q,B',4] reordered anchor logits (unsigmoided cxcywh), with grad


def efficient_region_embeddings(attn_pool: nn.Module, layer4: NestedTensor, boxes: torch.Tensor,
                                chunk_size: int = PREMATCH_CHUNK) -> torch.Tensor:
    """Pre-matching's pooling of `boxes [B,N,4]` (cxcywh in 0..1) on layer4 -> `[B,N,D]`, L2-normalised.

    q/k/v projections (with biases) are applied to every pixel first and then RoI-aligned at S x S;
    the query is the mean of the aligned q vectors, keys/values are the S*S aligned k/v vectors, each
    plus the positional embedding's projection (no bias). The mean token is thus never a key or value,
    unlike CLIP's own pooling ("I keep a bug here to trade accuracy for efficiency"), and RoIAlign's
    zeros outside the map attenuate the biases of boxes crossing the border. Runs in fp32.

    At evaluation (the attention pool in eval mode, outside `models.backbone.reference_eval()`) the same
    function is computed without materialising the S x S aligned q/k/v vectors of every box, which
    costs 3E channels of RoIAlign per box: RoIAlign is linear and separable (`models.region_head`), so
    with the per-box weights `Wy [S,h]`, `Wx [S,w]` the query is `(mean Wy ⊗ mean Wx)·Q + q_pe`, a head's
    scores are the RoIAlign of the one-channel map `q_h·K_h` plus `q_h·k_pe`, and its output is
    `sum_yx A_h[y,x] V_h[y,x] + sum_j a_hj v_pe[j]` with `A_h = Wy^T a_h Wx` the attention spread back
    onto the pixels: three `N x (h·w) x E` products per image. Same result up to float rounding.
    """
    if not attn_pool.training and fast_eval_enabled():
        return _fast_region_embeddings(attn_pool, layer4, boxes, chunk_size)
    b, n, _ = boxes.shape
    grid = round((attn_pool.positional_embedding.shape[0] - 1) ** 0.5)
    pe = attn_pool.positional_embedding.float()
    with torch.autocast(device_type=boxes.device.type, enabled=False):
        x = layer4.tensors.float().permute(0, 2, 3, 1)
        weight = torch.cat([attn_pool.q_proj.weight, attn_pool.k_proj.weight, attn_pool.v_proj.weight]).float()
        bias = torch.cat([attn_pool.q_proj.bias, attn_pool.k_proj.bias, attn_pool.v_proj.bias]).float()
        qkv = F.linear(x, weight, bias).permute(0, 3, 1, 2).contiguous()  # [B,3E,h,w]
        q_pe = pe[:1] @ attn_pool.q_proj.weight.float().t()  # [1,E]
        k_pe = pe[1:] @ attn_pool.k_proj.weight.float().t()  # [S*S,E]
        v_pe = pe[1:] @ attn_pool.v_proj.weight.float().t()
        sizes = valid_sizes(layer4.mask)
        rois = boxes_to_feature_xyxy(boxes.float(), sizes)
        # One RoI list over the batch, in image-major order, with the image index in column 0.
        batch_index = torch.arange(b, device=boxes.device, dtype=rois.dtype).repeat_interleave(n)[:, None]
        rois = torch.cat([batch_index, rois.reshape(-1, 4)], dim=1)
        e = q_pe.shape[-1]
        out = []
        for chunk in rois.split(chunk_size):
            aligned = roi_align(qkv, chunk, output_size=(grid, grid), spatial_scale=1.0,
                                sampling_ratio=-1, aligned=True)  # [K,3E,S,S]
            aligned = aligned.flatten(2).transpose(1, 2)  # [K,S*S,3E]
            q = aligned[..., :e].mean(dim=1, keepdim=True) + q_pe
            k = aligned[..., e:2 * e] + k_pe
            v = aligned[..., 2 * e:] + v_pe
            pooled = multi_head_pool(q, k, v, attn_pool.num_heads)[:, 0]
            out.append(F.linear(pooled, attn_pool.c_proj.weight.float(), attn_pool.c_proj.bias.float()))
        emb = torch.cat(out) if out else qkv.new_zeros(0, attn_pool.c_proj.out_features)
    return F.normalize(emb, dim=-1).reshape(b, n, -1)


def _fast_region_embeddings(attn_pool: nn.Module, layer4: NestedTensor, boxes: torch.Tensor,
                            chunk_size: int) -> torch.Tensor:
    """`efficient_region_embeddings` computed through the pixels (its docstring); `[B,N,D]` normalised."""
    b, n, _ = boxes.shape
    grid = round((attn_pool.positional_embedding.shape[0] - 1) ** 0.5)
    heads = attn_pool.num_heads
    with torch.autocast(device_type=boxes.device.type, enabled=False):
        pe = attn_pool.positional_embedding.float()
        wq, wk, wv = (proj.weight.float() for proj in (attn_pool.q_proj, attn_pool.k_proj, attn_pool.v_proj))
        e = wq.shape[0]
        head_dim = e // heads
        q_pe = pe[0] @ wq.t()  # [E]
        k_pe = (pe[1:] @ wk.t()).view(-1, heads, head_dim)  # [S*S,H,d]
        v_pe = (pe[1:] @ wv.t()).view(-1, heads, head_dim)
        sizes = valid_sizes(layer4.mask)
        height, width = layer4.tensors.shape[-2:]
        out = []
        for i in range(b):
            x = layer4.tensors[i].float().permute(1, 2, 0).reshape(height * width, -1)  # [h*w,C]
            q_map = F.linear(x, wq, attn_pool.q_proj.bias.float())  # [h*w,E]
            k_map = F.linear(x, wk, attn_pool.k_proj.bias.float()).view(-1, heads, head_dim).transpose(0, 1)
            v_map = F.linear(x, wv, attn_pool.v_proj.bias.float()).view(-1, heads, head_dim).transpose(0, 1)
            xyxy = boxes_to_feature_xyxy(boxes[i:i + 1].float(), sizes[i:i + 1])[0]
            wy, _ = roi_axis_weights(xyxy[:, 1], xyxy[:, 3], grid, height)  # [N,S,h]
            wx, _ = roi_axis_weights(xyxy[:, 0], xyxy[:, 2], grid, width)  # [N,S,w]
            for part in torch.arange(n, device=boxes.device).split(chunk_size):
                py, px = wy[part], wx[part]
                k = part.shape[0]
                mean_weights = (py.mean(dim=1)[:, :, None] * px.mean(dim=1)[:, None, :]).view(k, -1)  # [K,h*w]
                q = (mean_weights @ q_map + q_pe) * head_dim ** -0.5  # [K,E]
                q_heads = q.view(k, heads, head_dim).transpose(0, 1)  # [H,K,d]
                score_map = torch.bmm(q_heads, k_map.transpose(1, 2)).view(heads, k, height, width)  # [H,K,h,w]
                scores = torch.einsum("kiy,hkyx,kjx->khij", py, score_map, px).reshape(k, heads, -1)
                scores = scores + torch.einsum("hkd,jhd->khj", q_heads, k_pe)
                attn = torch.softmax(scores, dim=-1)  # [K,H,S*S]
                spread = torch.einsum("khij,kiy,kjx->hkyx", attn.view(k, heads, grid, grid), py, px)
                pooled = torch.bmm(spread.reshape(heads, k, -1), v_map)  # [H,K,d]
                pooled = pooled + torch.einsum("khj,jhd->hkd", attn, v_pe)
                pooled = pooled.transpose(0, 1).reshape(k, e)
                out.append(F.linear(pooled, attn_pool.c_proj.weight.float(), attn_pool.c_proj.bias.float()))
        emb = torch.cat(out) if out else boxes.new_zeros(0, attn_pool.c_proj.out_features)
    return F.normalize(emb, dim=-1).reshape(b, n, -1)


def prematch_anchors(anchors: torch.Tensor, layer4: NestedTensor, attn_pool: nn.Module, text_features: torch.Tensor,
                     *, boost: NovelBoost | None = None, split_mask: torch.Tensor | None = None) -> PrematchResult:
    """Assign each anchor a class and reorder the anchors by class, per image.

    anchors: `query_embed.weight [Q,4]` (logits of cxcywh). text_features `[C,D]` (normalised).
    boost multiplies the probabilities of its classes before the arg-max (the original's eval-time
    `--target_class_factor` on novel classes; `models.inference.detect` passes it). split_mask `[C]`
    bool (split_class training): the batch doubles; the first half sees only classes where it is
    False, the second only where True.
    """
    b = layer4.tensors.shape[0]
    q = anchors.shape[0]
    with torch.no_grad():
        boxes = anchors.detach().sigmoid()[None].expand(b, q, 4)
        roi = efficient_region_embeddings(attn_pool, layer4, boxes)  # [B,Q,D]
        if split_mask is None:
            sims = roi @ text_features.t()
        else:
            first = text_features.masked_fill(split_mask[:, None], 0)
            second = text_features.masked_fill(~split_mask[:, None], 0)
            sims = torch.cat([roi @ first.t(), roi @ second.t()])  # [2B,Q,C]
        sims = torch.cat([sims, torch.full_like(sims[..., :1], BACKGROUND_LOGIT)], dim=-1)
        prob = torch.softmax(PREMATCH_TAU * sims, dim=-1)[..., :-1]
        if boost is not None:
            idx = torch.as_tensor(boost.indices, device=prob.device)
            prob[..., idx] = prob[..., idx] * boost.factor
        classes = prob.argmax(dim=-1)
        # Stable, so the order is reproducible on every device; the decoder treats queries as a set.
        classes, order = classes.sort(dim=-1, stable=True)
    refpoints = anchors[order].transpose(0, 1)  # [Q,B',4], keeps the gradient to query_embed
    return PrematchResult(classes=classes, anchor_index=order, refpoints=refpoints)
