"""Model outputs -> per-image detections in pixels (SPEC §6.1)."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import boxes as tv_boxes

from models.config import ModelConfig
from util.box_ops import box_cxcywh_to_xyxy

SCORE_THRESHOLD = 0.001
NMS_IOU = 0.5


def nms_uses_per_class_variant(num_candidates: int, device: torch.device) -> bool:
    """Which of its two NMS variants torchvision 0.29's `batched_nms` runs: per-class `nms` on the raw boxes
    iff `boxes.numel() > 4000` on a CPU (`> 100_000` elsewhere), else one `nms` on class-shifted boxes.
    Both give the same detections up to float rounding of IoUs near 0.5 and ties (models/pruned_eval.py)."""
    return 4 * num_candidates > (4000 if device.type == "cpu" else 100_000)


def class_wise_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou: float) -> torch.Tensor:
    """`torchvision.ops.batched_nms` as torchvision 0.29 dispatches it, whatever torchvision is installed
    (older releases switch variants at another size on CUDA): the pruned scoring's exactness argument
    depends on knowing which variant runs. Indices kept, by decreasing score."""
    if nms_uses_per_class_variant(boxes.shape[0], boxes.device):
        return tv_boxes._batched_nms_vanilla(boxes, scores, labels, iou)
    return tv_boxes._batched_nms_coordinate_trick(boxes, scores, labels, iou)


class PostProcess(nn.Module):
    """Class-wise NMS over all (query, class) pairs with score > 0.001, then the top `max_detections`.

    Without NMS (`use_nms=False`) the top `max_detections` of all (query, class) scores are taken.
    """

    def __init__(self, *, max_detections: int = 100, use_nms: bool = True):
        super().__init__()
        self.max_detections = max_detections
        self.use_nms = use_nms

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """outputs: `pred_logits [B,Q,C]` (logits of scores), `pred_boxes [B,Q,4]` cxcywh in 0..1;
        target_sizes `[B,2]` = (h, w) of each image in the pixels wanted.

        Returns per image `scores [K]` (descending), `labels [K]` (index into the categories),
        `boxes [K,4]` xyxy pixels (not clipped), `query_index [K]` (the query each came from).
        """
        prob = outputs["pred_logits"].sigmoid()
        boxes = box_cxcywh_to_xyxy(outputs["pred_boxes"])
        h, w = target_sizes.unbind(1)
        scale = torch.stack([w, h, w, h], dim=1).to(boxes.dtype)
        results = []
        for p, b, s in zip(prob, boxes, scale):
            num_classes = p.shape[1]
            if self.use_nms:
                finite = torch.isfinite(b).all(dim=1) & torch.isfinite(p).all(dim=1)
                query, label = torch.nonzero((p > SCORE_THRESHOLD) & finite[:, None], as_tuple=True)
                scores = p[query, label]
                keep = class_wise_nms(b[query].float(), scores.float(), label, NMS_IOU)[: self.max_detections]
                query, label, scores = query[keep], label[keep], scores[keep]
            else:
                scores, flat = p.flatten().topk(min(self.max_detections, p.numel()))
                query, label = flat // num_classes, flat % num_classes
            results.append({"scores": scores, "labels": label, "boxes": b[query] * s, "query_index": query})
        return results


def build_postprocessors(cfg: ModelConfig) -> dict[str, nn.Module]:
    return {"bbox": PostProcess(max_detections=cfg.max_detections, use_nms=cfg.use_nms)}
