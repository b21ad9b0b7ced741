"""Hungarian matching of decoder queries to ground-truth boxes with CORA's class-consistency mask (SPEC §5.2).

The cost of assigning query q to GT box j is

    C[q, j] = cost_bbox · L1(box_q, box_j) + cost_class · focal(p_q, label_j) − cost_giou · GIoU(box_q, box_j)

computed for the whole batch at once; when the outputs carry `proposal_classes` (the anchors' pre-matched
classes, `--remove_misclassified`), pairs whose proposal class differs from the GT's `ori_labels`, and every
pair of a GT that no class-consistent query overlaps with GIoU > 0, cost `MASKED_COST`. Each image is then
solved on its own columns and matches that landed on a masked pair are dropped, so a GT box is supervised
only by a query of its own (pre-matched) class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from models.assignment import scipy_assignment, solver_for
from models.config import ModelConfig
from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

# The original writes 99 into masked entries and removes matched pairs whose cost is >= 99.
MASKED_COST = 99.0

Indices = tuple[torch.Tensor, torch.Tensor]
AssignmentSolver = Callable[[Sequence[torch.Tensor]], list[Indices]]


class HungarianMatcher(nn.Module):
    """One-to-one matching of the `Q` queries of each image to its GT boxes.

    Expected `outputs` (one decoder layer):
      * `pred_logits` `[B,Q,K]`: K = 1 objectness logit in training; at evaluation the final layer holds K
        class logits and the cost reads the target label's column (0 after `class_agnostic_targets`: class 0).
      * `pred_boxes` `[B,Q,4]`: cxcywh normalised to the unpadded image.
      * `proposal_classes` `[B,Q]` (optional): pre-matched class per query (index into the categories).
    Expected `targets[b]`: `boxes` `[T_b,4]` cxcywh normalised, `labels` `[T_b]` (class-agnostic, all 0) and,
    when `proposal_classes` is given, `ori_labels` `[T_b]` (dataset labels, as indices into the categories).
    """

    def __init__(
        self,
        *,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        solver: AssignmentSolver = scipy_assignment,
        remove_misclassified: bool = True,
    ):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all matching costs are 0")
        self.cost_class = cost_class
        self.remove_misclassified = remove_misclassified
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.solver = solver

    @torch.no_grad()
    def cost_matrices(self, outputs: dict, targets: Sequence[dict]) -> list[torch.Tensor]:
        """Per image the `[Q, T_b]` cost matrix (masked pairs = `MASKED_COST`), on the outputs' device."""
        bs, num_queries = outputs["pred_boxes"].shape[:2]
        # Costs are computed between every query of the batch and every GT of the batch, as the original
        # does; the cross-image blocks are simply never used.
        out_prob = outputs["pred_logits"].flatten(0, 1).sigmoid()  # [B·Q, K]
        out_bbox = outputs["pred_boxes"].flatten(0, 1)  # [B·Q, 4]
        tgt_ids = torch.cat([t["labels"] for t in targets])  # [ΣT]
        tgt_bbox = torch.cat([t["boxes"] for t in targets]).to(out_bbox)  # [ΣT, 4]

        prob = out_prob[:, tgt_ids]  # [B·Q, ΣT]
        alpha, gamma = self.focal_alpha, self.focal_gamma
        neg_cost = (1 - alpha) * (prob**gamma) * (-(1 - prob + 1e-8).log())
        pos_cost = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
        cost_class = pos_cost - neg_cost
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
        giou = generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))

        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * (-giou)
        # [B, Q, ΣT]; ΣT given explicitly so that a batch without any GT box works
        cost = cost.view(bs, num_queries, len(tgt_ids))

        if self.remove_misclassified and "proposal_classes" in outputs:
            # A GT only "has a class" in its own image (−1 elsewhere): cross-image pairs are never valid.
            images = torch.arange(bs, device=cost.device)
            # built where the labels are (no host-to-device copy, no data-dependent size)
            image_of_gt = torch.cat([torch.full_like(t["ori_labels"], b) for b, t in enumerate(targets)])  # [ΣT]
            ori = torch.cat([t["ori_labels"] for t in targets]).to(cost.device)
            image_of_gt = image_of_gt.to(cost.device)
            own_image = image_of_gt.unsqueeze(0) == images.unsqueeze(1)  # [B, ΣT]
            batched_ori = torch.where(own_image, ori.unsqueeze(0), -1)
            valid = outputs["proposal_classes"].unsqueeze(-1) == batched_ori.unsqueeze(1)  # [B, Q, ΣT]
            # A GT stays matchable only if some class-consistent query already overlaps it (GIoU > 0).
            overlapped = (giou.view(bs, num_queries, -1) > 0) & valid
            valid &= overlapped.any(dim=1, keepdim=True)
            cost = cost.masked_fill(~valid, MASKED_COST)

        sizes = [len(t["boxes"]) for t in targets]
        return [c[b] for b, c in enumerate(cost.split(sizes, dim=-1))]

    @torch.no_grad()
    def forward(self, outputs: dict, targets: Sequence[dict]) -> list[Indices]:
        """Returns per image `(query_indices, target_indices)` (CPU int64, ascending query index) of the
        surviving matches: assignments onto a masked pair (cost >= `MASKED_COST`) are removed."""
        return self.match_layers([outputs], targets)[0]

    @torch.no_grad()
    def match_layers(self, layers: Sequence[dict], targets: Sequence[dict]) -> list[list[Indices]]:
        """`forward` for several decoder layers' outputs at once: the solver gets the cost matrices of
        every layer and image in one call (one batch for the torch solver, one host copy each), and which
        assignments landed on masked pairs is read for all of them at once (`unmasked`)."""
        costs = [c for outputs in layers for c in self.cost_matrices(outputs, targets)]
        solutions = self.solver(costs)
        matches = [(rows[keep], cols[keep]) for (rows, cols), keep in zip(solutions, unmasked(costs, solutions),
                                                                         strict=True)]
        per_layer = len(targets)
        return [matches[i:i + per_layer] for i in range(0, len(matches), per_layer)]


def unmasked(costs: Sequence[torch.Tensor], solutions: Sequence[Indices]) -> list[torch.Tensor]:
    """Per cost matrix, which of its assigned pairs `(rows, cols)` (CPU int64) cost less than `MASKED_COST`
    (CPU bool). All matrices at once: their costs are read on their device through one index tensor (pinned
    and copied asynchronously on CUDA) and the answer comes back in one copy, the only host sync."""
    sizes = [len(rows) for rows, _ in solutions]
    if sum(sizes) == 0:
        return [torch.zeros(0, dtype=torch.bool) for _ in sizes]
    offsets = [0]
    for c in costs[:-1]:
        offsets.append(offsets[-1] + c.numel())
    index = torch.cat([offset + rows * c.shape[1] + cols
                       for offset, c, (rows, cols) in zip(offsets, costs, solutions, strict=True)])
    flat = torch.cat([c.reshape(-1) for c in costs])
    if flat.is_cuda:
        index = index.pin_memory()
    picked = flat[index.to(flat.device, non_blocking=True)]
    return list((picked < MASKED_COST).cpu().split(sizes))


def build_matcher(cfg: ModelConfig) -> HungarianMatcher:
    return HungarianMatcher(
        cost_class=cfg.set_cost_class, cost_bbox=cfg.set_cost_bbox, cost_giou=cfg.set_cost_giou,
        remove_misclassified=cfg.remove_misclassified, solver=solver_for(cfg.matcher_backend),
    )
