"""The fast evaluation path (issue 19) computes what the reference path computes, up to float rounding.

Folded trunk (models/backbone.py), separable RoIAlign + commuted 1x1 convolutions + per-head attention
pool (models/region_head.py), the planned pruning schedule (models/pruned_eval.py), the opt-in bf16
Predictor. The reference is `models.backbone.reference_eval()`: the code before the fast path.
"""
from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch import nn
from torchvision.ops import box_iou, roi_align

import models.pruned_eval as pruned_eval
from models import ModelConfig, build_cora
from models.backbone import (
    Backbone,
    FoldedTrunk,
    fast_eval_enabled,
    folded_trunk,
    invalidate_folded_trunk,
    reference_eval,
)
from models.clip import CLIPArchitecture, attention_pool, build_visual, read_clip_archive, resolve_archive_path
from models.inference import detect
from models.postprocess import PostProcess
from models.pruned_eval import PruneSpec, first_stop_position, pruned_logits, score_bound
from models.region_head import (
    RegionHead,
    _roi_separable,
    boxes_to_feature_xyxy,
    mean_query_pool,
    region_embeddings,
    roi_axis_weights,
)
from tests import golden
from util.box_ops import inverse_sigmoid
from util.nested_tensor import NestedTensor

# A miniature RN50-like CLIP (RN50's block counts are not needed: the structure is)
MINI = CLIPArchitecture((1, 2, 2, 2), 16, 64, 7, 64, 1, 77, 100)


def _randomise(visual: nn.Module, gen: torch.Generator, pool: nn.Module | None = None) -> nn.Module:
    """Non-trivial batch-norm statistics, positional embedding and attention biases (random init has
    identity batch norms and zero biases, which would hide a wrong fold)."""
    with torch.no_grad():
        for m in visual.modules():
            if m.__class__.__name__ == "FrozenBatchNorm2d":
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
        pool = visual.attnpool if pool is None else pool
        pool.positional_embedding.copy_(torch.randn(pool.positional_embedding.shape, generator=gen) * 0.5)
        for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
            proj.bias.copy_(torch.randn(proj.bias.shape, generator=gen) * 0.5)
    return visual


@pytest.fixture(scope="module")
def trunk() -> Backbone:
    gen = torch.Generator().manual_seed(3)
    return Backbone(_randomise(build_visual(MINI), gen)).eval()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _images(gen, shapes=((160, 224), (128, 192))):
    h = max(s[0] for s in shapes)
    w = max(s[1] for s in shapes)
    images = torch.zeros(len(shapes), 3, h, w)
    mask = torch.ones(len(shapes), h, w, dtype=torch.bool)
    for i, (hh, ww) in enumerate(shapes):
        images[i, :, :hh, :ww] = torch.randn(3, hh, ww, generator=gen)
        mask[i, :hh, :ww] = False
    return NestedTensor(images, mask)


def _boxes(gen, n: int) -> torch.Tensor:
    """cxcywh boxes in 0..1, some crossing the border, tiny, degenerate or covering everything."""
    cxcy = torch.rand(n, 2, generator=gen) * 1.2 - 0.1
    wh = torch.rand(n, 2, generator=gen) * 0.9 + 1e-3
    boxes = torch.cat([cxcy, wh], 1)
    special = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.05, 0.05], [1.0, 1.0, 0.3, 0.01],
                            [0.5, 0.5, 0.0, 0.0], [0.3, 0.7, 2.0, 2.0]])
    boxes[:5] = special[:n]
    return boxes


# --------------------------------------------------------------------------- folded trunk


def test_folded_trunk_equals_the_unfolded_one(trunk):
    samples = _images(torch.Generator().manual_seed(0))
    fast = trunk(samples)
    with reference_eval():
        assert not fast_eval_enabled()
        ref = trunk(samples)
    assert fast_eval_enabled()
    for name in ("layer3", "layer4"):
        assert torch.equal(fast[name].mask, ref[name].mask)
        assert fast[name].tensors.is_contiguous()
        assert _relative(fast[name].tensors, ref[name].tensors) < 1e-5, name


def test_training_keeps_the_unfolded_trunk(trunk):
    samples = _images(torch.Generator().manual_seed(1))
    with reference_eval():
        ref = trunk(samples)
    trunk.train()
    try:
        train = trunk(samples)
    finally:
        trunk.eval()
    for name in ("layer3", "layer4"):
        assert torch.equal(train[name].tensors, ref[name].tensors)


def test_fold_is_outside_the_state_dict_and_follows_the_weights():
    gen = torch.Generator().manual_seed(4)
    backbone = Backbone(_randomise(build_visual(MINI), gen)).eval()
    keys = list(backbone.state_dict())
    samples = _images(gen)
    first = folded_trunk(backbone)
    assert isinstance(first, FoldedTrunk) and folded_trunk(backbone) is first  # cached
    backbone(samples)
    assert list(backbone.state_dict()) == keys  # nothing registered
    # new weights (as a checkpoint load writes them): the fold is rebuilt
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    state["body.bn1.running_mean"] += 0.3
    state["body.layer3.0.conv2.weight"] *= 1.5
    backbone.load_state_dict(state)
    assert folded_trunk(backbone) is not first
    fast = backbone(samples)["layer3"].tensors
    with reference_eval():
        ref = backbone(samples)["layer3"].tensors
    assert _relative(fast, ref) < 1e-5
    # in-place edits of a weight itself are seen; edits through .data need invalidate_folded_trunk
    second = folded_trunk(backbone)
    with torch.no_grad():
        backbone.body.layer1[0].bn2.bias.add_(0.1)
    assert folded_trunk(backbone) is not second
    third = folded_trunk(backbone)
    invalidate_folded_trunk(backbone)
    assert folded_trunk(backbone) is not third
    # a deep copy (the EMA model) folds its own weights
    clone = copy.deepcopy(backbone)
    assert folded_trunk(clone) is not folded_trunk(backbone)
    assert list(clone.state_dict()) == keys


def test_folded_trunk_casts_once_per_dtype(trunk):
    bf16 = folded_trunk(trunk, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and folded_trunk(trunk, torch.bfloat16) is bf16
    assert folded_trunk(trunk).dtype == torch.float32


# --------------------------------------------------------------------------- region head


def test_separable_roi_align_equals_torchvision(trunk):
    gen = torch.Generator().manual_seed(5)
    for height, width in ((10, 14), (7, 5), (1, 9)):
        feature = torch.randn(24, height, width, generator=gen)
        boxes = _boxes(gen, 200)
        sizes = torch.tensor([[width - 1.0 if width > 1 else 1.0, float(height)]])
        xyxy = boxes_to_feature_xyxy(boxes[None], sizes)[0]
        for bins in (14, 18, 2):
            ref = roi_align(feature[None], [xyxy], (bins, bins), 1.0, -1, True)
            wy, win_y = roi_axis_weights(xyxy[:, 1], xyxy[:, 3], bins, height)
            wx, win_x = roi_axis_weights(xyxy[:, 0], xyxy[:, 2], bins, width)
            ours = _roi_separable(feature.permute(1, 2, 0).contiguous(), wy, wx, win_y.tolist(), win_x.tolist())
            assert (ours.permute(0, 3, 1, 2) - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-7, (height, width, bins)


def test_mean_query_pool_equals_attention_pool(trunk):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(9, MINI.trunk_width, 7, 7, generator=gen)
    with torch.no_grad():
        ref = attention_pool(trunk.attn_pool, x)
        ours = mean_query_pool(trunk.attn_pool, x.permute(0, 2, 3, 1))
    assert _relative(ours, ref) < 1e-5


@pytest.mark.parametrize("expected,separable", [(None, None), (1, True), (10_000, True), (1, False),
                                               (10_000, False)])
def test_fast_region_embeddings_equal_the_reference(trunk, expected, separable):
    """Map projections by count, never, always; RoIAlign separable (CPU) or by torchvision (CUDA's)."""
    gen = torch.Generator().manual_seed(7)
    layer3 = trunk(_images(gen))["layer3"]
    boxes = [_boxes(gen, 70), _boxes(gen, 3)]
    with torch.no_grad():
        if expected is None:
            fast = region_embeddings(trunk, layer3, boxes)
        else:
            head = RegionHead(trunk, layer3, chunk_size=16, separable=separable)
            fast = torch.cat([head.embed(i, b, expected=expected) for i, b in enumerate(boxes)])
        with reference_eval():
            ref = region_embeddings(trunk, layer3, boxes)
    assert fast.shape == ref.shape == (73, MINI.output_dim)
    assert (fast - ref).abs().max() < 1e-5


def test_fast_prematch_pooling_equals_the_reference(trunk):
    """Anchor pre-matching's pooling through the pixels (models/prematch.py) = RoIAlign of q/k/v first."""
    from models.prematch import efficient_region_embeddings

    gen = torch.Generator().manual_seed(14)
    layer4 = trunk(_images(gen))["layer4"]
    anchors = torch.randn(300, 4, generator=gen) * 2
    boxes = anchors.sigmoid()[None].expand(2, -1, -1)
    with torch.no_grad():
        fast = efficient_region_embeddings(trunk.attn_pool, layer4, boxes, chunk_size=64)
        with reference_eval():
            ref = efficient_region_embeddings(trunk.attn_pool, layer4, boxes)
        trunk.attn_pool.train()  # training (the golden step) keeps the reference
        try:
            train = efficient_region_embeddings(trunk.attn_pool, layer4, boxes)
        finally:
            trunk.attn_pool.eval()
    assert fast.shape == ref.shape == (2, 300, MINI.output_dim)
    assert (fast - ref).abs().max() < 1e-5
    assert torch.equal(train, ref)


def test_generic_convolutions_equal_the_packed_ones(trunk):
    """`_Convs` (GEMMs + the convolution library: CUDA's path) and `_PackedConvs` (oneDNN, prepacked, fused)."""
    from models.region_head import _Convs, _PackedConvs

    if not _PackedConvs.available(torch.device("cpu")):
        pytest.skip("no oneDNN on this build")
    gen = torch.Generator().manual_seed(13)
    layer3 = trunk(_images(gen))["layer3"]
    boxes = _boxes(gen, 20)
    with torch.no_grad():
        packed = RegionHead(trunk, layer3).embed(0, boxes, expected=100)
        head = RegionHead(trunk, layer3)
        head.convs = _Convs()
        generic = head.embed(0, boxes, expected=100)
    assert (packed - generic).abs().max() < 1e-5


def test_region_head_rows_do_not_depend_on_other_chunks(trunk):
    """The pruned path relies on a box's numbers depending only on its own chunk (module doc)."""
    gen = torch.Generator().manual_seed(8)
    layer3 = trunk(_images(gen))["layer3"]
    boxes = _boxes(gen, 40)
    with torch.no_grad():
        a = RegionHead(trunk, layer3, chunk_size=8).embed(0, boxes, expected=100)
        b = RegionHead(trunk, layer3, chunk_size=8).embed(0, boxes, expected=100)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- detections


def _same_detections(ref: list[dict], fast: list[dict], sizes: torch.Tensor) -> None:
    """The same detections up to rounding: the same (query, label) pairs, each with its score within
    1e-5 + 1e-4 relative and its box within 1e-4 of the image side; the order is the same but for pairs
    whose scores are within that tolerance (random weights give many near-ties), and a pair may only
    be exchanged at the K-th place for one with the same score up to the tolerance."""
    for a, b, size in zip(ref, fast, sizes, strict=True):
        tol = 1e-5 + 1e-4 * a["scores"].max().item() if len(a["scores"]) else 0.0
        ours, theirs = ({(int(q), int(lab)): (s, box) for q, lab, s, box in
                         zip(r["query_index"], r["labels"], r["scores"], r["boxes"])} for r in (b, a))
        assert len(ours) == len(theirs)
        for key in ours.keys() ^ theirs.keys():  # exchanged at the cut
            cut = (b if key in ours else a)["scores"][-1]
            assert abs((ours.get(key) or theirs.get(key))[0] - cut) <= tol, key
        for key in ours.keys() & theirs.keys():
            assert abs(ours[key][0] - theirs[key][0]) <= tol, key
            assert (ours[key][1] - theirs[key][1]).abs().max() <= 1e-4 * size.max(), key
        assert ((a["scores"] - b["scores"]).abs() <= tol).all()  # positions agree up to ties


@pytest.mark.parametrize("prune", [True, False])
def test_golden_detections_fast_equal_reference(tiny, prune):
    model, post = tiny
    inputs = golden.load("inputs.pth")
    samples = NestedTensor(inputs["batch"], inputs["mask"])
    sizes = torch.stack([t["orig_size"] for t in inputs["targets"]])
    fast = detect(model, samples, inputs["eval_categories"], postprocess=post, target_sizes=sizes, prune=prune)
    with reference_eval():
        ref = detect(model, samples, inputs["eval_categories"], postprocess=post, target_sizes=sizes, prune=prune)
    _same_detections(ref.results, fast.results, sizes)


@pytest.mark.parametrize("queries,shapes", [(200, [(160, 224), (192, 160)]), (60, [(96, 128)])])
def test_random_miniature_detections_fast_equal_reference(queries, shapes):
    arch, _ = read_clip_archive(resolve_archive_path("clip_RN50", golden.path("clip_tiny.pt")))
    torch.manual_seed(queries)
    args = golden.model_args(num_queries=queries, enc_layers=1, dec_layers=2)
    model = build_cora(ModelConfig.from_args(args), arch).eval()
    _randomise(model.backbone.trunk, torch.Generator().manual_seed(9), pool=model.backbone.trunk.attn_pool)
    gen = torch.Generator().manual_seed(queries)
    images = [torch.randn(3, h, w, generator=gen) for h, w in shapes]
    sizes = torch.tensor(shapes)
    categories = golden.load("inputs.pth")["eval_categories"]
    for post in (PostProcess(), PostProcess(use_nms=False)):
        fast = detect(model, images, categories, postprocess=post, target_sizes=sizes)
        with reference_eval():
            ref = detect(model, images, categories, postprocess=post, target_sizes=sizes)
        _same_detections(ref.results, fast.results, sizes)


# --------------------------------------------------------------------------- the pruning schedule


def _brute_first_stop(bounds: torch.Tensor, num_classes: int, k: int) -> int:
    for p in range(1, len(bounds)):
        beta = bounds[p].double()
        if torch.isfinite(beta) and beta > 0:
            count = torch.floor(bounds[:p].double() * (1 + pruned_eval.COUNT_SLACK) / beta).clamp(max=num_classes)
            if count.sum() >= k:
                return p
    return len(bounds)


def test_first_stop_position_is_the_smallest_possible():
    gen = torch.Generator().manual_seed(10)
    for spread, classes, k in ((0.0, 65, 100), (0.01, 65, 100), (2.5, 65, 100), (2.5, 3, 300), (6.0, 1203, 300)):
        obj = torch.randn(1000, generator=gen) * spread - 2.0
        bounds = score_bound(obj).sort(descending=True).values
        assert first_stop_position(bounds, classes, k) == _brute_first_stop(bounds, classes, k), (spread, classes, k)
    equal = score_bound(torch.full((1000,), -2.0)).sort(descending=True).values
    assert first_stop_position(equal, 65, 100) == 100  # one score above the next bound per query at most
    assert first_stop_position(equal[:80], 65, 100) == 80  # fewer queries than K: only when complete
    # unbounded queries (NaN objectness) count C each; never stop while one is unscored
    with_nan = torch.tensor([float("inf")] * 3 + [0.5] * 400)
    assert first_stop_position(with_nan, 65, 100) == 3
    assert first_stop_position(with_nan, 20, 100) == 43


def test_schedule_by_device_and_reference():
    assert PruneSpec().schedule(torch.device("cpu")) == (50, 1.25)
    assert PruneSpec().schedule(torch.device("cuda")) == (256, 2.0)  # few rounds: each check waits for the GPU
    assert PruneSpec(first_chunk=7, growth=1.5).schedule(torch.device("cuda")) == (7, 1.5)
    with reference_eval():
        assert PruneSpec().schedule(torch.device("cuda")) == (50, 1.25)


def _uniform_case(gen, queries=600, classes=65):
    """Random-weight-like scores: nearly equal objectness, nearly uniform class probabilities: nothing
    can be pruned."""
    obj = torch.randn(2, queries, 1, generator=gen) * 0.01 - 0.5
    cls = torch.randn(2, queries, classes, generator=gen) * 0.01
    probs = torch.softmax(torch.cat([cls, torch.zeros(2, queries, 1)], -1), -1)[..., :-1]
    boxes = torch.cat([torch.rand(2, queries, 2, generator=gen),
                       torch.rand(2, queries, 2, generator=gen) * 0.4 + 0.02], -1)
    return boxes, obj, inverse_sigmoid(probs * obj.sigmoid(), eps=1e-5)


@pytest.mark.parametrize("spec", [PruneSpec(), PruneSpec(first_chunk=256, growth=2.0), PruneSpec(plan=False)])
def test_nothing_prunable_costs_no_postprocess(monkeypatch, spec):
    """Where nothing can be pruned the checks never run PostProcess's NMS, and the result is the full one."""
    boxes, obj, logits = _uniform_case(torch.Generator().manual_seed(11))
    calls = Counter()
    original = PostProcess.forward

    def counting(self, *args, **kwargs):
        calls["post"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PostProcess, "forward", counting)
    trace: list = []
    def score_fn(picks):
        return [logits[b, q] for b, q in enumerate(picks)]

    pruned, scored = pruned_logits(boxes, obj, logits.shape[-1], score_fn, spec, trace=trace)
    assert scored.all() and torch.equal(pruned, logits)
    assert calls["post"] == 0
    if spec.plan:  # decided up front: the first round already scores the K queries stopping needs
        assert min(position for _, position, _ in trace) >= 100


@pytest.mark.parametrize("schedule", [(256, 2.0), (50, 1.25)])
def test_planned_schedules_give_the_full_detections(schedule):
    """Trained-like synthetic scores, both device schedules: identical detections, and scoring stops early."""
    gen = torch.Generator().manual_seed(12)
    obj = torch.randn(2, 1000, 1, generator=gen) * 2.5 - 4.0
    cls = torch.randn(2, 1000, 65, generator=gen) * 8.0
    probs = torch.softmax(torch.cat([cls, torch.zeros(2, 1000, 1)], -1), -1)[..., :-1]
    boxes = torch.cat([torch.rand(2, 1000, 2, generator=gen), torch.rand(2, 1000, 2, generator=gen) * 0.5 + 0.02], -1)
    logits = inverse_sigmoid(probs * obj.sigmoid(), eps=1e-5)
    spec = PruneSpec(first_chunk=schedule[0], growth=schedule[1])
    pruned, scored = pruned_logits(boxes, obj, 65, lambda picks: [logits[b, q] for b, q in enumerate(picks)], spec)
    post = PostProcess()
    sizes = torch.tensor([[480.0, 640.0]] * 2)
    for a, b in zip(post({"pred_logits": logits, "pred_boxes": boxes}, sizes),
                    post({"pred_logits": pruned, "pred_boxes": boxes}, sizes), strict=True):
        for key in ("labels", "query_index", "boxes", "scores"):
            assert torch.equal(a[key], b[key]), key
    assert scored.float().mean() < 0.8


# --------------------------------------------------------------------------- bf16 (Predictor only)


def _bf16_supported() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_precision_is_checked():
    from models.predictor import check_precision

    assert check_precision("fp32", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="precision"):
        check_precision("fp16", torch.device("cpu"))


@pytest.mark.skipif(not _bf16_supported(), reason="this CPU has no native bfloat16 (AVX512-BF16 / AMX)")
def test_bf16_predictor_detects_like_fp32():
    import demo_inputs
    from models.predictor import Predictor

    kwargs = dict(clip_archive=demo_inputs.TOY_CLIP, region_prompt=demo_inputs.TOY_PROMPT, device="cpu",
                  disk_cache=False)
    fp32 = Predictor.from_checkpoint(demo_inputs.TOY_CHECKPOINT, **kwargs)
    bf16 = Predictor.from_checkpoint(demo_inputs.TOY_CHECKPOINT, precision="bf16", **kwargs)
    assert bf16.precision == "bf16"
    names, _, _ = demo_inputs.toy_vocabulary()
    images = sorted(demo_inputs.TOY_SAMPLES_DIR.iterdir())
    for a, b in zip(fp32.predict(images, names), bf16.predict(images, names), strict=True):
        assert len(b) > 0 and b.scores.dtype == torch.float32 and torch.isfinite(b.boxes).all()
        assert (b.scores[1:] <= b.scores[:-1]).all()
        # every confident fp32 detection has a bf16 twin: same class, IoU >= 0.75, score within 0.02 (ranks
        # swap between near-equal scores, and the decoder's box refinement in bf16 moves a box by a few
        # pixels: on the toy scenes the worst twin has IoU 0.80, so detections are matched, not ranked)
        confident = a.scores >= 0.2
        assert confident.any()
        iou = box_iou(a.boxes[confident], b.boxes)
        same = a.labels[confident, None] == b.labels[None, :]
        close = (a.scores[confident, None] - b.scores[None, :]).abs() < 0.02
        assert (same & close & (iou >= 0.75)).any(dim=1).all()


def test_demo_has_the_precision_flag():
    import demo

    assert demo.get_parser().parse_args(["--precision", "bf16"]).precision == "bf16"
    assert demo.get_parser().parse_args([]).precision == "fp32"
