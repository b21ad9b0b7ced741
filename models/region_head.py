"""CLIP region classification of boxes (SPEC §3.11, §4).

One piece of code for the three stages that classify regions with CLIP: the detector's eval
scores, region-prompt training and CLIP-aligned labelling. A box is RoI-aligned from layer3 at
2S x 2S, run through CLIP's layer4 (stride 2 -> S x S) and pooled by CLIP's attention pool, whose
positional embedding is the (learned) region prompt.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from models.backbone import Backbone, valid_sizes
from models.clip import attention_pool
from util.box_ops import box_cxcywh_to_xyxy, inverse_sigmoid
from util.nested_tensor import NestedTensor

REGION_CHUNK = 512  # RoIs per layer4 call: bounds memory (RN50: 512 x 1024 x 14 x 14 floats)


def boxes_to_feature_xyxy(boxes: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """cxcywh boxes normalised to the unpadded image `[B,N,4]` -> xyxy in feature cells of each image's
    valid area (`sizes [B,2]` = (W_valid, H_valid))."""
    xyxy = box_cxcywh_to_xyxy(boxes)
    scale = torch.cat([sizes, sizes], dim=-1)[:, None, :].to(xyxy.dtype)
    return xyxy * scale


def region_embeddings(trunk: Backbone, layer3: NestedTensor, boxes: list[torch.Tensor],
                      chunk_size: int = REGION_CHUNK) -> torch.Tensor:
    """L2-normalised CLIP embeddings of boxes.

    layer3: the trunk's stride-16 map `[B,E/2,h,w]` with its mask. boxes: per image `[N_i,4]`
    cxcywh normalised to the unpadded image. Returns `[sum N_i, D]` in the same order.
    """
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
