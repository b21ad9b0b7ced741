"""Matcher and criterion without the model: the original's own outputs (../shared/golden) fed to our losses,
plus hand-computed cases for the focal loss, the class-consistency removal and the degenerate batches."""

import math

import pytest
import torch

from models.config import ModelConfig
from models.criterion import (
    SetCriterion,
    build_criterion,
    build_weight_dict,
    class_agnostic_targets,
    sigmoid_focal_loss,
)
from models.matcher import HungarianMatcher, build_matcher, scipy_assignment
from tests import golden

TRAIN_FILES = ["train_step.pth", "train_step_split.pth", "train_step_empty_target.pth"]


def _criterion(dec_layers: int = 3) -> SetCriterion:
    cfg = ModelConfig(dec_layers=dec_layers, remove_misclassified=True)
    return build_criterion(cfg, build_matcher(cfg))


def _rel_close(a: float, b: float, rel: float = 1e-4, abs_: float = 1e-6) -> bool:
    return abs(a - b) <= max(rel * abs(b), abs_)


def _anchor_pairs(indices, anchor_index: torch.Tensor, b: int) -> set[tuple[int, int]]:
    """Image b's matches as (anchor row, GT index): positions depend on a non-stable sort, anchors do not."""
    q, t = indices[b]
    return {(int(anchor_index[b, i]), int(j)) for i, j in zip(q, t, strict=True)}


def _assert_loss_dict(ours: dict, ref: dict):
    assert list(ours) == list(ref), f"keys {list(ours)} != {list(ref)}"
    for k, v in ref.items():
        assert ours[k].shape == v.shape, k
        assert _rel_close(ours[k].item(), v.item()), (k, ours[k].item(), v.item())


def _leaf_outputs(outputs: dict) -> dict:
    """A copy of golden outputs whose logits and boxes are leaf tensors that collect gradients."""

    def leaf(d):
        d = dict(d)
        for k in ("pred_logits", "pred_boxes"):
            d[k] = d[k].detach().clone().requires_grad_(True)
        return d

    out = leaf(outputs)
    out["aux_outputs"] = [leaf(a) for a in outputs["aux_outputs"]]
    return out


# --------------------------------------------------------------------------- golden


@pytest.mark.parametrize("name", TRAIN_FILES)
def test_matcher_indices_match_original(name):
    ref = golden.load(name)
    criterion = _criterion()
    outputs, targets, anchor_index = ref["outputs"], ref["criterion_targets"], ref["anchor_index"]
    layers = [outputs] + list(outputs["aux_outputs"])
    assert len(layers) == len(ref["matcher_indices"])
    for layer, (layer_outputs, theirs) in enumerate(zip(layers, ref["matcher_indices"], strict=True)):
        ours = criterion.matcher(layer_outputs, targets)
        assert len(ours) == len(theirs) == len(targets)
        for b in range(len(targets)):
            q, t = ours[b]
            assert q.dtype == t.dtype == torch.int64
            assert torch.equal(q, q.sort().values), "query indices must be ascending"
            assert _anchor_pairs(ours, anchor_index, b) == _anchor_pairs(theirs, anchor_index, b), (
                f"{name} layer {layer} image {b}"
            )


@pytest.mark.parametrize("name", TRAIN_FILES)
def test_train_loss_dict_matches_original(name):
    ref = golden.load(name)
    criterion = _criterion()
    loss_dict = criterion(ref["outputs"], ref["criterion_targets"])
    _assert_loss_dict(loss_dict, ref["loss_dict"])
    assert criterion.weight_dict == ref["weight_dict"]
    weighted = sum(loss_dict[k] * criterion.weight_dict[k] for k in loss_dict if k in criterion.weight_dict)
    assert _rel_close(weighted.item(), ref["weighted_loss"])


def test_split_iteration_is_marked_and_skips_matched_gt():
    ref = golden.load("train_step_split.pth")
    # the original marks a split forward with outputs['split_class'] = True; the batch is doubled
    assert ref["outputs"]["split_class"] is True
    assert ref["outputs"]["pred_logits"].shape[0] == len(ref["criterion_targets"]) == 4
    loss_dict = _criterion()(ref["outputs"], ref["criterion_targets"])
    assert "matched_gt" not in loss_dict and "matched_gt" not in ref["loss_dict"]
    outputs = {k: v for k, v in ref["outputs"].items() if k != "split_class"}
    assert "matched_gt" in _criterion()(outputs, ref["criterion_targets"])


@pytest.mark.parametrize("name", ["eval_tcf8.pth", "eval_tcf1.pth"])
def test_eval_logging_loss_matches_original(name):
    """The evaluation loop's logging pass: 65 class logits in the final layer (matcher and focal loss read
    class 0 for the class-agnostic label 0), objectness in the aux layers; targets: class-agnostic
    labels_eval."""
    ref = golden.load(name)
    inputs = golden.load("inputs.pth")
    targets = [
        {"boxes": t["boxes"], "labels": t["labels_eval"], "image_id": t["image_id"]}
        for t in inputs["targets"]
    ]
    assert ref["outputs"]["pred_logits"].shape[-1] == 65
    loss_dict = _criterion()(ref["outputs"], class_agnostic_targets(targets))
    _assert_loss_dict(loss_dict, ref["loss_dict"])


def test_eval_tcf8_has_no_match_and_clamps_num_boxes():
    # with the novel ×8 boost no anchor is pre-matched to a GT class, so nothing survives the class mask:
    # num_boxes is clamped to 1 and matched_gt = 1 / 7 GT boxes
    ref = golden.load("eval_tcf8.pth")
    inputs = golden.load("inputs.pth")
    targets = class_agnostic_targets(
        [{"boxes": t["boxes"], "labels": t["labels_eval"]} for t in inputs["targets"]]
    )
    indices = HungarianMatcher()(ref["outputs"], targets)
    assert all(q.numel() == 0 for q, _ in indices)
    assert ref["loss_dict"]["matched_gt"].item() == pytest.approx(1 / 7)


@pytest.mark.parametrize("name", TRAIN_FILES)
def test_loss_backpropagates_into_outputs(name):
    ref = golden.load(name)
    criterion = _criterion()
    outputs = _leaf_outputs(ref["outputs"])
    loss_dict = criterion(outputs, ref["criterion_targets"])
    weighted = sum(loss_dict[k] * criterion.weight_dict[k] for k in loss_dict if k in criterion.weight_dict)
    weighted.backward()
    matched = ref["matcher_indices"][0]
    for b in range(len(matched)):
        grad_logits = outputs["pred_logits"].grad[b]
        assert torch.isfinite(grad_logits).all() and (grad_logits != 0).all()
        grad_boxes = outputs["pred_boxes"].grad[b]
        is_matched = torch.zeros(grad_boxes.shape[0], dtype=torch.bool)
        is_matched[matched[b][0]] = True
        # only matched queries receive box gradients
        assert (grad_boxes[~is_matched] == 0).all()
        assert (grad_boxes[is_matched].abs().sum(-1) > 0).all()
    for aux in outputs["aux_outputs"]:
        assert aux["pred_logits"].grad is not None and torch.isfinite(aux["pred_logits"].grad).all()


# --------------------------------------------------------------------------- hand-computed


def test_focal_loss_two_elements_by_hand():
    logits = torch.tensor([0.0, math.log(3.0)])  # p = 0.5, 0.75
    targets = torch.tensor([1.0, 0.0])
    loss = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0)
    # positive: α · (1−p)² · −log p = 0.25 · 0.25 · log 2
    # negative: (1−α) · p² · −log(1−p) = 0.75 · 0.5625 · log 4
    expected = torch.tensor([0.25 * 0.25 * math.log(2.0), 0.75 * 0.5625 * math.log(4.0)])
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)


def _box(cx, cy, w, h):
    return [cx, cy, w, h]


def test_loss_values_by_hand():
    """One image, two queries, one GT: loss_ce = Σ focal / num_boxes, boxes losses of the matched pair."""
    logits = torch.tensor([[[0.0], [math.log(3.0)]]])
    boxes = torch.tensor([[_box(0.5, 0.5, 0.4, 0.4), _box(0.2, 0.2, 0.1, 0.1)]])
    gt = torch.tensor([_box(0.5, 0.5, 0.2, 0.4)])  # inside query 0's box: IoU = GIoU = 0.5
    targets = class_agnostic_targets([{"boxes": gt, "labels": torch.tensor([3])}])
    loss = _criterion(dec_layers=1)({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert list(loss) == [
        "loss_ce",
        "class_error",
        "loss_bbox",
        "loss_giou",
        "cardinality_error",
        "matched_gt",
    ]
    assert loss["loss_ce"].item() == pytest.approx(
        0.25 * 0.25 * math.log(2.0) + 0.75 * 0.5625 * math.log(4.0)
    )
    assert loss["loss_bbox"].item() == pytest.approx(0.2)
    assert loss["loss_giou"].item() == pytest.approx(0.5)
    assert loss["class_error"].item() == 0.0
    assert loss["cardinality_error"].item() == 1.0  # no query counts with one logit: |0 − 1|
    assert loss["matched_gt"].item() == 1.0


def test_cost_matrix_by_hand():
    """C = 5·L1 + 2·(focal_pos − focal_neg at p) − 2·GIoU; with several logits the label's column (0) counts.

    (Golden matches do not depend on the class cost, so it is checked here.)"""
    logits = torch.tensor([[[0.0, 9.0], [math.log(3.0), -9.0]]])  # column 1 must not matter
    boxes = torch.tensor([[_box(0.5, 0.5, 0.4, 0.4), _box(0.2, 0.2, 0.1, 0.1)]])
    gt = torch.tensor([_box(0.5, 0.5, 0.2, 0.4)])
    targets = class_agnostic_targets([{"boxes": gt, "labels": torch.tensor([3])}])
    cost = HungarianMatcher().cost_matrices({"pred_logits": logits, "pred_boxes": boxes}, targets)[0]

    def focal_cost(p):
        return 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p**2 * -math.log(1 - p + 1e-8)

    # query 0 contains the GT (IoU = GIoU = 0.5); query 1 is disjoint: L1 = 1.0, enclosing box 0.45 × 0.55,
    # union 0.01 + 0.08
    giou_1 = -(0.45 * 0.55 - 0.09) / (0.45 * 0.55)
    expected = torch.tensor(
        [[5 * 0.2 + 2 * focal_cost(0.5) - 2 * 0.5], [5 * 1.0 + 2 * focal_cost(0.75) - 2 * giou_1]]
    )
    torch.testing.assert_close(cost, expected, rtol=1e-5, atol=1e-6)


def _misclassified_case():
    """4 queries, 3 GTs of one image:
    GT0 (class 5) sits on query 0 (class 5): kept.
    GT1 (class 7) sits on query 1 (class 2); no query has class 7: dropped.
    GT2 (class 9) sits on query 2 (class 2); query 3 has class 9 but lies far away (GIoU < 0): dropped."""
    boxes = torch.tensor(
        [
            [
                _box(0.2, 0.2, 0.2, 0.2),
                _box(0.5, 0.5, 0.2, 0.2),
                _box(0.8, 0.8, 0.2, 0.2),
                _box(0.1, 0.9, 0.1, 0.1),
            ]
        ]
    )
    outputs = {
        "pred_logits": torch.zeros(1, 4, 1),
        "pred_boxes": boxes,
        "proposal_classes": torch.tensor([[5, 2, 2, 9]]),
    }
    gt = torch.tensor([_box(0.2, 0.2, 0.2, 0.2), _box(0.5, 0.5, 0.2, 0.2), _box(0.8, 0.8, 0.2, 0.2)])
    targets = class_agnostic_targets([{"boxes": gt, "labels": torch.tensor([5, 7, 9])}])
    return outputs, targets


def test_remove_misclassified_drops_gt_without_consistent_query():
    outputs, targets = _misclassified_case()
    matcher = HungarianMatcher()
    ((q, t),) = matcher(outputs, targets)
    assert q.tolist() == [0] and t.tolist() == [0]
    cost = matcher.cost_matrices(outputs, targets)[0]
    assert (cost[:, 1] == 99).all()  # no query of class 7
    assert (cost[:, 2] == 99).all()  # the class-9 query does not overlap GT2
    assert (cost[1:, 0] == 99).all() and cost[0, 0] < 99
    # without proposal classes the same boxes match all three GTs, so the mask is what removes them
    plain = {k: v for k, v in outputs.items() if k != "proposal_classes"}
    ((q, t),) = matcher(plain, targets)
    assert sorted(zip(q.tolist(), t.tolist(), strict=True)) == [(0, 0), (1, 1), (2, 2)]


def test_overlapping_consistent_query_keeps_gt():
    # move the class-9 query onto GT2: it becomes matchable, to that query, not the better-placed class-2 one
    outputs, targets = _misclassified_case()
    outputs["pred_boxes"][0, 3] = torch.tensor(_box(0.75, 0.75, 0.2, 0.2))
    ((q, t),) = HungarianMatcher()(outputs, targets)
    assert list(zip(q.tolist(), t.tolist(), strict=True)) == [(0, 0), (3, 2)]


def test_num_boxes_counts_surviving_matches_and_clamps_to_one():
    outputs, targets = _misclassified_case()
    criterion = _criterion(dec_layers=1)
    loss = criterion(outputs, targets)
    # one surviving match: num_boxes 1, matched_gt = 1 / 3
    assert loss["matched_gt"].item() == pytest.approx(1 / 3)
    # no surviving match: num_boxes clamps to 1, no box loss, class_error 100
    outputs["proposal_classes"] = torch.tensor([[1, 1, 1, 1]])
    loss = criterion(outputs, targets)
    focal_neg = 0.75 * 0.25 * math.log(2.0)  # logit 0, target 0
    assert loss["loss_ce"].item() == pytest.approx(4 * focal_neg)
    assert loss["loss_bbox"].item() == 0.0 and loss["loss_giou"].item() == 0.0
    assert loss["class_error"].item() == 100.0
    assert loss["matched_gt"].item() == pytest.approx(1 / 3)


def test_num_boxes_is_the_final_layers_count_for_aux_layers():
    outputs, targets = _misclassified_case()
    # aux layer: the same boxes but a class that keeps GT1 matchable, so it has 2 matches; final layer has 1
    aux = dict(outputs, proposal_classes=torch.tensor([[5, 7, 2, 9]]))
    outputs = dict(outputs, aux_outputs=[aux])
    loss = _criterion(dec_layers=2)(outputs, targets)
    assert len(HungarianMatcher()(aux, targets)[0][0]) == 2
    # both aux matches are exact boxes (GIoU 1) so the box losses are 0; the focal term shows num_boxes:
    # 2 positives (logit 0) and 2 negatives, divided by the final layer's num_boxes = 1
    focal_pos, focal_neg = 0.25 * 0.25 * math.log(2.0), 0.75 * 0.25 * math.log(2.0)
    assert loss["loss_ce_0"].item() == pytest.approx(2 * focal_pos + 2 * focal_neg)
    assert loss["loss_giou_0"].item() == pytest.approx(0.0, abs=1e-7)
    assert set(loss) == {
        "loss_ce",
        "class_error",
        "loss_bbox",
        "loss_giou",
        "cardinality_error",
        "matched_gt",
        "loss_ce_0",
        "loss_bbox_0",
        "loss_giou_0",
        "cardinality_error_0",
    }


def test_image_without_boxes():
    outputs, targets = _misclassified_case()
    outputs = {k: torch.cat([v, v]) for k, v in outputs.items()}
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "ori_labels": torch.zeros(0, dtype=torch.int64),
    }
    indices = HungarianMatcher()(outputs, [targets[0], empty])
    assert indices[0][0].tolist() == [0]
    assert indices[1][0].numel() == 0 and indices[1][0].dtype == torch.int64
    loss = _criterion(dec_layers=1)(outputs, [targets[0], empty])
    assert loss["cardinality_error"].item() == 1.5  # (3 + 0) / 2
    assert loss["matched_gt"].item() == pytest.approx(1 / 3)


def test_batch_without_any_box():
    # the original fails here (view of an empty cost matrix, then a division by zero GT); we log matched_gt 0
    outputs, _ = _misclassified_case()
    outputs["pred_logits"].requires_grad_(True)
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "ori_labels": torch.zeros(0, dtype=torch.int64),
    }
    loss = _criterion(dec_layers=1)(outputs, [empty])
    assert loss["loss_ce"].item() == pytest.approx(4 * 0.75 * 0.25 * math.log(2.0))
    assert loss["loss_bbox"].item() == 0.0 and loss["matched_gt"].item() == 0.0
    loss["loss_ce"].backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all()


def test_scipy_assignment_contract():
    cost = torch.tensor([[4.0, 1.0], [2.0, 0.0], [0.5, 3.0]])
    (rows, cols), (erows, ecols) = scipy_assignment([cost, torch.zeros(3, 0)])
    assert rows.tolist() == [1, 2] and cols.tolist() == [1, 0]
    assert erows.numel() == ecols.numel() == 0 and erows.dtype == torch.int64


def test_matcher_uses_plugged_solver():
    outputs, targets = _misclassified_case()
    seen = []

    def solver(costs):
        seen.append([tuple(c.shape) for c in costs])
        return scipy_assignment(costs)

    HungarianMatcher(solver=solver)(outputs, targets)
    assert seen == [[(4, 3)]]


def test_class_agnostic_targets():
    labels = torch.tensor([3, 0, 7])
    original = {"boxes": torch.rand(3, 4), "labels": labels, "image_id": torch.tensor([5])}
    (new,) = class_agnostic_targets([original])
    assert new["ori_labels"].tolist() == [3, 0, 7] and new["labels"].tolist() == [0, 0, 0]
    assert new["labels"].dtype == torch.int64
    assert original["labels"] is labels and "ori_labels" not in original  # input untouched
    assert new["boxes"] is original["boxes"]


def test_weight_dict():
    assert build_weight_dict(
        cls_loss_coef=2.0, bbox_loss_coef=5.0, giou_loss_coef=2.0, dec_layers=6, aux_loss=True
    ) == {
        f"{k}{s}": w
        for s in ["", "_0", "_1", "_2", "_3", "_4"]
        for k, w in (("loss_ce", 2.0), ("loss_bbox", 5.0), ("loss_giou", 2.0))
    }
    assert build_weight_dict(
        cls_loss_coef=2.0, bbox_loss_coef=5.0, giou_loss_coef=2.0, dec_layers=6, aux_loss=False
    ) == {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def test_without_remove_misclassified_proposal_classes_are_ignored():
    """--remove_misclassified off: a GT whose class no query has is still matched (no 99 mask)."""
    outputs = {
        "pred_logits": torch.zeros(1, 2, 1),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]]),
        "proposal_classes": torch.tensor([[3, 3]]),
    }
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]]), "labels": torch.tensor([0]),
                "ori_labels": torch.tensor([7])}]
    ((q, t),) = HungarianMatcher(remove_misclassified=False)(outputs, targets)
    assert q.tolist() == [0] and t.tolist() == [0]
    ((q, t),) = HungarianMatcher(remove_misclassified=True)(outputs, targets)
    assert q.tolist() == [] and t.tolist() == []
