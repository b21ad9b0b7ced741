"""Box format conversions, IoU / GIoU, and the logit used for box refinement."""
import os

import torch
from torchvision.ops.boxes import box_area


def box_cxcywh_to_xyxy(x: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = x.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(x: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = x.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise IoU and union of xyxy boxes: `[N,4] x [M,4] -> ([N,M], [N,M])`."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2 - inter
    return inter / union, union


# GIoU's degenerate-box check reads the boxes on the host: free on the CPU, a stall of the GPU queue on CUDA
# (twice per call, four calls per decoder layer and training iteration). On CUDA it runs only with
# CORA_CHECK_BOXES=1 (debugging); without it a degenerate (NaN) box shows as a non-finite loss, which stops
# training (util.run.check_finite).
CHECK_BOXES_ON_DEVICE = os.environ.get("CORA_CHECK_BOXES", "") == "1"


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU (https://giou.stanford.edu/) of xyxy boxes: `[N,4] x [M,4] -> [N,M]`.

    Degenerate boxes (x1 < x0, or NaN) would give inf/nan, so they are rejected early: a ValueError on the
    CPU; on a GPU only with CORA_CHECK_BOXES=1 (`CHECK_BOXES_ON_DEVICE`), since the check syncs with the host.
    """
    if boxes1.device.type == "cpu" or CHECK_BOXES_ON_DEVICE:
        if not (boxes1[:, 2:] >= boxes1[:, :2]).all():
            raise ValueError(f"generalized_box_iou: boxes1 has degenerate boxes (x1 < x0 or y1 < y0): {boxes1}")
        if not (boxes2[:, 2:] >= boxes2[:, :2]).all():
            raise ValueError(f"generalized_box_iou: boxes2 has degenerate boxes (x1 < x0 or y1 < y0): {boxes2}")
    iou, union = box_iou(boxes1, boxes2)
    lt = torch.min(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.max(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[..., 0] * wh[..., 1]
    return iou - (area - union) / area


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with both terms clamped to >= eps.

    The original uses eps 1e-5 in the detection heads and eval scores but 1e-3 inside the
    decoder's reference update; callers pass the one they need.
    """
    x = x.clamp(min=0, max=1)
    x1 = x.clamp(min=eps)
    x2 = (1 - x).clamp(min=eps)
    return torch.log(x1 / x2)
