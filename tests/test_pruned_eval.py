"""Pruned region scoring at evaluation (models/pruned_eval.py) gives the detections of the full path.

Three levels: the stopping logic alone on synthetic logits (bit-identical scores, so detections must be
identical, including worst cases built to defeat it); the detector on the golden miniature model and on
random weights (pruned vs `PruneSpec(prune=False)`, which scores every query in the same chunks, so
the scored logits must be bit-identical); `main.py --eval` with and without `--no_prune_eval`.
"""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import nms

from datasets.coco_ovd import COCO_OVD_NOVEL_INDICES
from models import ModelConfig, build_cora
from models.clip import read_clip_archive, resolve_archive_path
from models.inference import detect
from models.postprocess import SCORE_THRESHOLD, PostProcess, class_wise_nms, nms_uses_per_class_variant
from models.prematch import resolve_boost
from models.pruned_eval import (
    FILL_LOGIT,
    PruneSpec,
    nms_decisions_certain,
    pruned_logits,
)
from tests import golden
from util.box_ops import inverse_sigmoid
from util.nested_tensor import NestedTensor

SIZES = torch.tensor([[480.0, 640.0]])


def _assert_same_detections(full: list[dict], pruned: list[dict]) -> None:
    """Same boxes, labels, queries, order and bit-identical scores."""
    assert len(full) == len(pruned)
    for a, b in zip(full, pruned, strict=True):
        for key in ("labels", "query_index"):
            assert torch.equal(a[key], b[key]), key
        for key in ("boxes", "scores"):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------- stopping logic, synthetic


def _synthetic(gen: torch.Generator, *, images: int = 2, queries: int = 1000, classes: int = 65,
               obj_mean: float = -4.0, obj_std: float = 2.0, sharpness: float = 8.0, layout: str = "uniform"):
    """Boxes `[B,Q,4]`, objectness `[B,Q,1]` and the full eval logits `[B,Q,C]` = inverse_sigmoid(p·σ(o))."""
    obj = torch.randn(images, queries, 1, generator=gen) * obj_std + obj_mean
    if layout == "equal_objectness":
        obj = torch.full_like(obj, obj_mean)
    cls = torch.randn(images, queries, classes, generator=gen) * sharpness
    probs = torch.softmax(torch.cat([cls, torch.zeros(images, queries, 1)], -1), -1)[..., :-1]
    if layout == "clustered":  # many heavily overlapping boxes around a few centres
        centres = torch.rand(images, 4, 2, generator=gen) * 0.6 + 0.2
        pick = torch.randint(0, 4, (images, queries), generator=gen)
        cxcy = centres.gather(1, pick[..., None].expand(-1, -1, 2))
        cxcy = cxcy + torch.randn(images, queries, 2, generator=gen) * 0.01
        boxes = torch.cat([cxcy, 0.1 + torch.rand(images, queries, 2, generator=gen) * 0.02], -1)
    elif layout == "near_half_iou":  # pairs of boxes whose IoU is within ~1e-6 of 0.5
        base = torch.cat([torch.rand(images, queries // 2, 2, generator=gen) * 0.5 + 0.25,
                          torch.full((images, queries // 2, 2), 0.2)], -1)
        shifted = base.clone()
        shifted[..., 0] += 0.2 / 3 + torch.randn(images, queries // 2, generator=gen) * 1e-6  # IoU(shift w/3) = 1/2
        boxes = torch.stack([base, shifted], 2).flatten(1, 2)
        probs = probs[:, : boxes.shape[1]]
        obj = obj[:, : boxes.shape[1]]
        probs = torch.zeros_like(probs).scatter_(2, torch.zeros_like(probs[..., :1], dtype=torch.int64), 0.9)
    elif layout == "duplicates":  # bit-identical queries: identical scores (ties) and boxes (IoU 1)
        half = queries // 2
        boxes = torch.cat([torch.rand(images, half, 2, generator=gen),
                           torch.rand(images, half, 2, generator=gen) * 0.4 + 0.05], -1)
        boxes, probs, obj = (torch.cat([x[:, :half], x[:, :half]], 1) for x in (boxes, probs[:, :half], obj[:, :half]))
    else:
        boxes = torch.cat([torch.rand(images, queries, 2, generator=gen),
                           torch.rand(images, queries, 2, generator=gen) * 0.5 + 0.02], -1)
    logits = inverse_sigmoid(probs * obj.sigmoid(), eps=1e-5)
    return boxes, obj, logits


def _run_synthetic(boxes, obj, logits, spec: PruneSpec, duplicated: bool = False):
    """Pruned vs full on synthetic logits. `duplicated`: queries q and q + Q/2 are bit-identical, so a
    sort may order them either way (ties; module doc): compare them as one query."""
    trace: list = []
    def score_fn(picks):
        return [logits[b, q] for b, q in enumerate(picks)]

    pruned, scored = pruned_logits(boxes, obj, logits.shape[-1], score_fn, spec, trace=trace)
    torch.testing.assert_close(pruned[scored], logits[scored], rtol=0, atol=0, equal_nan=True)
    assert (pruned[~scored] == FILL_LOGIT).all()
    post = PostProcess(max_detections=spec.max_detections, use_nms=spec.use_nms)
    sizes = SIZES.expand(boxes.shape[0], 2)
    full = post({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    ours = post({"pred_logits": pruned, "pred_boxes": boxes}, sizes)
    if duplicated:
        for r in full + ours:
            r["query_index"] = r["query_index"] % (boxes.shape[1] // 2)
    _assert_same_detections(full, ours)
    return scored, trace


CASES = {
    "trained_like": {},
    "diffuse_classes": {"sharpness": 2.0},
    "confident": {"obj_mean": -1.0, "obj_std": 3.0},
    "few_candidates": {"obj_mean": -9.0, "obj_std": 1.0},  # fewer than K detections exist
    "clustered": {"layout": "clustered"},
    "equal_objectness": {"layout": "equal_objectness", "obj_mean": -2.0},
    "near_half_iou": {"layout": "near_half_iou", "obj_mean": -2.0},
    "duplicates": {"layout": "duplicates"},
    "few_classes": {"classes": 3, "obj_mean": -3.0},
}


def test_synthetic_pruned_equals_full_and_prunes():
    """Every case × NMS / top-K × K = 100 / 300 × chunk schedules: identical detections. Across the suite
    every stopping rule is used, and the realistic cases stop well before scoring every query."""
    gen = torch.Generator().manual_seed(0)
    reasons: Counter = Counter()
    fraction: dict[str, float] = {}
    for name, kwargs in CASES.items():
        boxes, obj, logits = _synthetic(gen, **kwargs)
        for spec in (PruneSpec(), PruneSpec(use_nms=False), PruneSpec(max_detections=300),
                     PruneSpec(first_chunk=7, growth=1.0), PruneSpec(use_nms=False, first_chunk=1, growth=2.0)):
            scored, trace = _run_synthetic(boxes, obj, logits, spec, duplicated=name == "duplicates")
            reasons.update(r for _, _, r in trace if r is not None)
            if spec == PruneSpec():
                fraction[name] = scored.float().mean().item()
    assert set(reasons) >= {"complete", "top_k", "per_class", "certain_iou"}, reasons
    assert fraction["trained_like"] < 0.3 and fraction["confident"] < 0.5, fraction
    assert fraction["equal_objectness"] == 1.0  # nothing can be ruled out: everything is scored


def test_synthetic_variant_rules():
    """Stops under rule (a) (more than 1000 candidates: per class on both sides) and rule (b) (few
    candidates possible, the maximum coordinate already scored: the same shift on both sides), with
    (c) disabled so that only those rules can stop early."""
    import models.pruned_eval as pruned_eval

    gen = torch.Generator().manual_seed(1)
    reasons: Counter = Counter()
    original = pruned_eval.nms_decisions_certain
    try:
        pruned_eval.nms_decisions_certain = lambda *args: False
        # (b): 5 confident queries own the largest coordinate, 200 plausible ones, the rest below 0.001
        for classes, k in ((2, 10), (3, 5), (2, 50)):
            boxes, obj, logits = _synthetic(gen, queries=1500, classes=classes, sharpness=6.0)
            boxes[..., :2] = boxes[..., :2].clamp(0.3, 0.7)
            boxes[..., 2:] = boxes[..., 2:].clamp(max=0.5)
            boxes[:, :5] = torch.tensor([0.9, 0.9, 0.2, 0.2])
            obj[:] = -9.0
            obj[:, :5] = 3.0
            obj[:, 5:205] = torch.randn(boxes.shape[0], 200, 1, generator=gen) - 3.0
            logits = inverse_sigmoid(torch.softmax(torch.cat([torch.randn(*logits.shape, generator=gen) * 6,
                                                               torch.zeros(*logits.shape[:2], 1)], -1), -1)[..., :-1]
                                     * obj.sigmoid(), eps=1e-5)
            _, trace = _run_synthetic(boxes, obj, logits, PruneSpec(max_detections=k, first_chunk=10, growth=1.2))
            reasons.update(r for _, _, r in trace if r is not None)
        # (a): diffuse classes and high objectness: thousands of candidates
        boxes, obj, logits = _synthetic(gen, obj_mean=0.0, obj_std=2.0, sharpness=1.0)
        _, trace = _run_synthetic(boxes, obj, logits, PruneSpec(first_chunk=20, growth=1.2))
        reasons.update(r for _, _, r in trace if r is not None)
    finally:
        pruned_eval.nms_decisions_certain = original
    assert {"same_shift", "per_class"} <= set(reasons), reasons


def test_non_finite_boxes_and_objectness():
    """Queries the full path drops (non-finite box or score) are dropped by the pruned path too."""
    gen = torch.Generator().manual_seed(2)
    boxes, obj, logits = _synthetic(gen)
    boxes[0, :20] = float("nan")
    obj[1, :20] = float("nan")
    logits[1, :20] = float("nan")
    obj[0, 20:40] = float("inf")
    for spec in (PruneSpec(), PruneSpec(use_nms=False)):
        _run_synthetic(boxes, obj, logits, spec)


def test_torchvision_dispatch_matches_the_variant_rule(monkeypatch):
    """`nms_uses_per_class_variant` mirrors the installed torchvision's (0.29) `batched_nms` dispatch, and
    PostProcess's `class_wise_nms` runs the variant it names with batched_nms's result."""
    from torchvision.ops import boxes as tv_boxes

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        for n in (1, 999, 1000, 1001, 24999, 25000, 25001):
            called = []
            vanilla, trick = tv_boxes._batched_nms_vanilla, tv_boxes._batched_nms_coordinate_trick
            monkeypatch.setattr(tv_boxes, "_batched_nms_vanilla",
                                lambda *a, _c=called, _f=vanilla: _c.append("v") or _f(*a))
            monkeypatch.setattr(tv_boxes, "_batched_nms_coordinate_trick",
                                lambda *a, _c=called, _f=trick: _c.append("t") or _f(*a))
            b = torch.rand(n, 4, device=device)
            b[:, 2:] += b[:, :2]
            torchvision.ops.batched_nms(b, torch.rand(n, device=device), torch.randint(0, 5, (n,), device=device), 0.5)
            assert called == ["v" if nms_uses_per_class_variant(n, device) else "t"], (device, n, called)
            scores, labels = torch.rand(n, device=device), torch.randint(0, 5, (n,), device=device)
            called.clear()
            expected = torchvision.ops.batched_nms(b, scores, labels, 0.5)
            assert torch.equal(class_wise_nms(b, scores, labels, 0.5), expected)
            assert len(called) == 2 and called[0] == called[1], called


def test_certain_iou_decisions_hold_under_every_rounding():
    """Pairs declared certain get the same NMS decision on raw float32 boxes and on boxes shifted by any
    class offset; pairs within float32 noise of 0.5 are declared uncertain."""
    gen = torch.Generator().manual_seed(3)
    n = 400
    x0 = torch.rand(n, generator=gen, dtype=torch.float64) * 0.5
    w = 0.05 + torch.rand(n, generator=gen, dtype=torch.float64) * 0.3
    # IoU of [x0, x0+w] and [x0+d, x0+d+w] (same height) is (w-d)/(w+d) = 1/2 at d = w/3
    spread = torch.logspace(-9, -2, n, dtype=torch.float64)
    d = w / 3 * (1 + torch.randn(n, generator=gen, dtype=torch.float64) * spread)
    a = torch.stack([x0, torch.full_like(x0, 0.2), x0 + w, torch.full_like(x0, 0.5)], 1)
    b = a.clone()
    b[:, [0, 2]] += d[:, None]
    all_boxes = torch.cat([a, b]).float()
    certain_count = 0
    for i in range(n):
        pair = torch.stack([a[i], b[i]]).float()
        certain = nms_decisions_certain(pair, torch.zeros(2, dtype=torch.int64), all_boxes, 65)
        decisions = set()
        for offset_class in (0, 1, 7, 64):
            for top in (1.0, 1.3):
                shifted = pair + offset_class * (top + 1.0)
                decisions.add(len(nms(shifted, torch.tensor([1.0, 0.5]), 0.5)))
        if certain:
            certain_count += 1
            assert len(decisions) == 1, i
    assert 0 < certain_count < n  # both outcomes occur over the sweep of distances from 0.5


# --------------------------------------------------------------------------- the detector


class _SpreadObjectness(nn.Module):
    """The objectness head plus a fixed per-query offset: a trained detector's spread of objectness
    (few confident queries), on random weights whose objectness is nearly constant."""

    def __init__(self, head: nn.Linear, offsets: torch.Tensor):
        super().__init__()
        self.head = head
        self.register_buffer("offsets", offsets)

    def forward(self, hs: torch.Tensor) -> torch.Tensor:  # [L,B,Q,d] -> [L,B,Q,1]
        return self.head(hs) + self.offsets[:, None]


class _FixedText(nn.Module):
    """Text features that separate classes (random unit vectors): peaked class probabilities."""

    def __init__(self, text: torch.Tensor):
        super().__init__()
        self.register_buffer("text", text)

    def forward(self, categories) -> torch.Tensor:
        return self.text[: len(categories)]


def _compare(model, post, samples, categories, sizes, boost=None):
    """`detect` with and without pruning on the same model; returns (pruned outputs, full outputs)."""
    full_detected = detect(model, samples, categories, postprocess=post, target_sizes=sizes, boost=boost, prune=False)
    pruned_detected = detect(model, samples, categories, postprocess=post, target_sizes=sizes, boost=boost)
    full, pruned = full_detected.outputs, pruned_detected.outputs
    assert full["scored_queries"].all()
    for key in ("pred_boxes", "proposal_classes", "anchor_index"):
        assert torch.equal(full[key], pruned[key]), key
    scored = pruned["scored_queries"]
    assert scored.dtype == torch.bool and scored.shape == full["pred_boxes"].shape[:2]
    assert (pruned["class_logits"][~scored] == FILL_LOGIT).all()
    assert torch.equal(full["class_logits"][scored], pruned["class_logits"][scored])
    _assert_same_detections(full_detected.results, pruned_detected.results)
    return pruned_detected, full_detected


def _boost(factor):
    return resolve_boost(factor, COCO_OVD_NOVEL_INDICES, 65)


@pytest.mark.parametrize("factor", [8.0, 1.0])
def test_golden_batch_pruned_equals_full(tiny, factor):
    model, post = tiny
    inputs = golden.load("inputs.pth")
    sizes = torch.stack([t["orig_size"] for t in inputs["targets"]])
    pruned, _ = _compare(model, post, NestedTensor(inputs["batch"], inputs["mask"]), inputs["eval_categories"], sizes,
                         _boost(factor))
    # the golden file's detections, too (same check as tests/test_model_golden.py, on the pruned path)
    ref = golden.load(f"eval_tcf{int(factor)}.pth")
    for res, ref_res in zip(pruned.results, ref["results"], strict=True):
        assert torch.equal(res["labels"], ref_res["labels"])
        assert ((res["scores"] - ref_res["scores"]).abs() <= 1e-5 + 1e-4 * ref_res["scores"]).all()


@pytest.mark.parametrize("photo", [0, 1])
def test_golden_single_images_pruned_equals_full(tiny, photo):
    model, post = tiny
    inputs = golden.load("inputs.pth")
    # factor 1: the coffee photo has an NMS pair 5e-5 from the threshold here
    image = inputs["images"][photo][None]
    samples = NestedTensor(image, torch.zeros(1, *image.shape[-2:], dtype=torch.bool))
    _compare(model, post, samples, inputs["eval_categories"], torch.tensor([image.shape[-2:]]))


@pytest.mark.parametrize("factor", [8.0, 1.0])
def test_golden_weights_with_trained_like_scores_prune(tiny, factor):
    """The golden model with spread objectness and separated text features: scoring stops early and the
    detections are still those of the full path (LVIS's 300 and no-NMS top-K too)."""
    model, post = tiny
    inputs = golden.load("inputs.pth")
    gen = torch.Generator().manual_seed(5)
    head, classifier = model.objectness_embed, model.classifier
    model.objectness_embed = _SpreadObjectness(head, torch.randn(300, generator=gen) * 2.5 - 4.0)
    model.classifier = _FixedText(nn.functional.normalize(torch.randn(65, 64, generator=gen), dim=-1))
    try:
        sizes = torch.stack([t["orig_size"] for t in inputs["targets"]])
        samples = NestedTensor(inputs["batch"], inputs["mask"])
        for p in (post, PostProcess(max_detections=300), PostProcess(use_nms=False)):
            pruned, _ = _compare(model, p, samples, inputs["eval_categories"], sizes, _boost(factor))
            scored = pruned.outputs["scored_queries"]
            if p is post:  # with 300 queries and K = 100 much of the batch still needs scoring
                assert scored.float().mean() < 0.8, scored.sum(1)
    finally:
        model.objectness_embed, model.classifier = head, classifier


@pytest.fixture(scope="module")
def tiny_architecture():
    arch, _ = read_clip_archive(resolve_archive_path("clip_RN50", golden.path("clip_tiny.pt")))
    return arch


@pytest.mark.parametrize("queries,shapes,spread", [
    (40, [(96, 128)], False),
    (300, [(160, 224), (192, 160)], False),
    (500, [(224, 288)], True),
    (600, [(128, 128), (96, 160)], True),
])
def test_random_weights_pruned_equals_full(tiny_architecture, queries, shapes, spread):
    torch.manual_seed(queries)
    args = golden.model_args(num_queries=queries, enc_layers=1, dec_layers=2)
    model = build_cora(ModelConfig.from_args(args), tiny_architecture).eval()  # random CLIP and detector weights
    if spread:
        model.objectness_embed = _SpreadObjectness(model.objectness_embed, torch.randn(queries) * 2.5 - 4.0)
        model.classifier = _FixedText(nn.functional.normalize(torch.randn(65, 64), dim=-1))
    images = [torch.randn(3, h, w) for h, w in shapes]
    sizes = torch.tensor(shapes)
    categories = golden.load("inputs.pth")["eval_categories"]
    pruned, _ = _compare(model, PostProcess(), images, categories, sizes)
    _compare(model, PostProcess(use_nms=False), images, categories, sizes)
    if spread:  # queries whose objectness bound is below 0.001 are never scored
        assert (pruned.outputs["scored_queries"].sum(1) < queries).all()


# --------------------------------------------------------------------------- main.py


@pytest.mark.slow
def test_main_eval_same_stats_with_and_without_pruning(tmp_path, monkeypatch):
    from tests.helpers import run_main
    from tests.tiny_coco import make_tiny_coco

    coco = tmp_path / "coco"
    make_tiny_coco(coco)
    calls = []
    import models.inference

    original = models.inference.pruned_detection_logits

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append((kwargs["spec"].prune, out[1].float().mean().item()))
        return out

    monkeypatch.setattr(models.inference, "pruned_detection_logits", spy)
    stats = {}
    results = {}
    for mode, extra in (("pruned", ()), ("full", ("--no_prune_eval",))):
        calls.clear()
        out = tmp_path / mode
        stats[mode] = run_main(coco, out, "--eval", "--num_queries", "200", *extra)
        results[mode] = json.loads((out / "results_bbox.json").read_text())
        assert calls, "--eval did not score regions"
        if mode == "pruned":
            assert all(prune for prune, _ in calls)
        else:
            assert calls == [(False, 1.0)] * len(calls), "--no_prune_eval did not score every query"
    assert stats["pruned"] == stats["full"]
    assert results["pruned"] == results["full"]
    assert SCORE_THRESHOLD > torch.sigmoid(torch.tensor(FILL_LOGIT))  # unscored queries never detected
