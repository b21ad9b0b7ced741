"""Class-agnostic training losses (SPEC §5.3): sigmoid focal loss on the objectness logit, L1 and GIoU on the
boxes of the Hungarian matches, for the final decoder layer and each auxiliary layer.

Logged alongside (not losses, no weight): `class_error`, `cardinality_error` and `matched_gt`, because the
training console line and log.txt report them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.matcher import HungarianMatcher
from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

Indices = tuple[torch.Tensor, torch.Tensor]


def class_agnostic_targets(targets: Sequence[dict]) -> list[dict]:
    """The criterion's view of dataset targets (SPEC §2.2): `ori_labels` = the dataset `labels` (used only
    by the matcher's class-consistency mask), `labels` = 0 for every box (one objectness "class").

    Returns new dicts (shallow copies); the input targets are left untouched.
    """
    return [{**t, "ori_labels": t["labels"], "labels": torch.zeros_like(t["labels"])} for t in targets]


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Element-wise focal loss (RetinaNet) of logits against {0,1} targets of the same shape; not reduced.

    Written in the DETR-family form (BCE-with-logits × (1 − p_t)^γ × α_t) so that gradients agree with the
    original's, not only values.
    """
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return loss


def _matched_positions(indices: Sequence[Indices]) -> tuple[torch.Tensor, torch.Tensor]:
    """(image index, query index) of every match, image-major — for indexing `[B,Q,...]` outputs."""
    batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
    query_idx = torch.cat([src for src, _ in indices])
    return batch_idx, query_idx


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class SetCriterion(nn.Module):
    """Matches each decoder layer to the targets and returns the unweighted loss dict.

    `outputs`: `pred_logits` `[B,Q,K]`, `pred_boxes` `[B,Q,4]` (cxcywh normalised), optionally
    `proposal_classes` `[B,Q]`, `split_class`, and `aux_outputs` (one dict per intermediate decoder layer,
    same keys).
    `targets`: class-agnostic targets (see `class_agnostic_targets`), `boxes` `[T_b,4]` cxcywh normalised.

    Keys: `loss_ce`, `class_error`, `loss_bbox`, `loss_giou`, `cardinality_error`, `matched_gt` (not on
    split-class iterations), then `loss_ce_i`, `loss_bbox_i`, `loss_giou_i`, `cardinality_error_i` for aux
    layer i.
    """

    def __init__(
        self,
        *,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def loss_labels(
        self,
        outputs: dict,
        targets: Sequence[dict],
        indices: Sequence[Indices],
        num_boxes: float,
        log: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Focal loss of every (query, class) logit against the one-hot matched labels, Σ / num_boxes.

        In training K = 1 (objectness); the evaluation logging pass feeds K class logits and the same code
        then treats the target label (0) as class 0, as the original does.
        """
        src_logits = outputs["pred_logits"]  # [B, Q, K]
        batch_idx, query_idx = _matched_positions(indices)
        matched_labels = torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, indices, strict=True)])
        onehot = torch.zeros_like(src_logits)
        onehot[batch_idx, query_idx, matched_labels] = 1
        loss = sigmoid_focal_loss(src_logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma)
        # mean over queries then × Q (= Σ over all elements): the original's reduction, for identical rounding
        losses = {"loss_ce": loss.mean(1).sum() / num_boxes * src_logits.shape[1]}
        if log:
            with torch.no_grad():
                matched = src_logits[batch_idx, query_idx]
                if matched_labels.numel() == 0:
                    accuracy = torch.zeros((), device=src_logits.device)
                else:
                    accuracy = (matched.argmax(-1) == matched_labels).float().sum() * (
                        100.0 / matched_labels.numel()
                    )
                losses["class_error"] = 100 - accuracy
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs: dict, targets: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Mean over images of |#queries whose arg-max is not the last class − #GT| (logging only).

        With one objectness logit no query counts, so this is the mean number of GT boxes per image.
        """
        logits = outputs["pred_logits"]
        card_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        num_gt = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
        return {"cardinality_error": F.l1_loss(card_pred.float(), num_gt.float())}

    def loss_boxes(
        self, outputs: dict, targets: Sequence[dict], indices: Sequence[Indices], num_boxes: float
    ) -> dict[str, torch.Tensor]:
        """Σ L1(cxcywh) / num_boxes and Σ (1 − GIoU(xyxy)) / num_boxes over the matched pairs."""
        batch_idx, query_idx = _matched_positions(indices)
        src_boxes = outputs["pred_boxes"][batch_idx, query_idx]  # [N, 4]
        target_boxes = torch.cat([t["boxes"][tgt] for t, (_, tgt) in zip(targets, indices, strict=True)])
        target_boxes = target_boxes.to(src_boxes)
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")
        giou = torch.diag(
            generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes))
        )
        return {"loss_bbox": loss_bbox.sum() / num_boxes, "loss_giou": (1 - giou).sum() / num_boxes}

    def _layer_losses(
        self, outputs: dict, targets: Sequence[dict], indices: Sequence[Indices], num_boxes: float, log: bool
    ) -> dict[str, torch.Tensor]:
        losses = self.loss_labels(outputs, targets, indices, num_boxes, log=log)
        losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        losses.update(self.loss_cardinality(outputs, targets))
        return losses

    def num_boxes(self, indices: Sequence[Indices], device: torch.device) -> float:
        """Surviving final-layer matches, averaged over ranks, at least 1: the normaliser of every layer."""
        count = torch.as_tensor(
            [float(sum(src.numel() for src, _ in indices))], dtype=torch.float, device=device
        )
        if _world_size() > 1:
            torch.distributed.all_reduce(count)
        return torch.clamp(count / _world_size(), min=1).item()

    def forward(self, outputs: dict, targets: Sequence[dict]) -> dict[str, torch.Tensor]:
        final = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        aux_layers = outputs.get("aux_outputs", [])
        indices, *aux_indices = self.matcher.match_layers([final, *aux_layers], targets)
        num_boxes = self.num_boxes(indices, outputs["pred_logits"].device)

        losses = self._layer_losses(final, targets, indices, num_boxes, log=True)
        if "split_class" not in outputs:
            total_gt = sum(len(t["labels"]) for t in targets)
            # num_boxes is already clamped to >= 1, so with no surviving match this logs 1 / #GT (as the
            # original). The original divides by zero on a batch without any GT box; 0 is logged instead.
            ratio = num_boxes / total_gt if total_gt > 0 else 0.0
            losses["matched_gt"] = torch.zeros_like(losses["loss_bbox"]) + ratio

        for i, (aux, layer_indices) in enumerate(zip(aux_layers, aux_indices, strict=True)):
            aux_losses = self._layer_losses(aux, targets, layer_indices, num_boxes, log=False)
            losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        return losses


def build_weight_dict(
    *, cls_loss_coef: float, bbox_loss_coef: float, giou_loss_coef: float, dec_layers: int, aux_loss: bool
) -> dict[str, float]:
    """Loss weights: final layer, then `_i` suffixes for the aux layers i < dec_layers − 1."""
    base = {"loss_ce": cls_loss_coef, "loss_bbox": bbox_loss_coef, "loss_giou": giou_loss_coef}
    weight_dict = dict(base)
    if aux_loss:
        for i in range(dec_layers - 1):
            weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
    return weight_dict


def build_criterion(cfg: ModelConfig, matcher: HungarianMatcher) -> SetCriterion:
    weight_dict = build_weight_dict(
        cls_loss_coef=cfg.cls_loss_coef,
        bbox_loss_coef=cfg.bbox_loss_coef,
        giou_loss_coef=cfg.giou_loss_coef,
        dec_layers=cfg.dec_layers,
        aux_loss=cfg.aux_loss,
    )
    return SetCriterion(matcher=matcher, weight_dict=weight_dict, focal_alpha=cfg.focal_alpha)
