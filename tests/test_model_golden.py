"""The detector against the original's outputs on the miniature model (../shared/golden)."""
import pytest
import torch

from models import build_model
from models.inference import detect
from models.prematch import resolve_boost
from tests import golden
from util.checkpoint import pick_weights
from util.nested_tensor import NestedTensor

NOVEL = (4, 5, 11, 12, 15, 16, 21, 23, 27, 29, 32, 34, 45, 47, 54, 58, 63)


@pytest.fixture(scope="module")
def tiny():
    """Built from the CLIP archive + region prompt, then the checkpoint's EMA weights (strict).

    Every query is CLIP-scored (`--no_prune_eval`) so that all per-anchor scores can be compared; the
    default pruned path is checked against the same golden detections in tests/test_pruned_eval.py."""
    args = golden.model_args()
    model, _, post = build_model(args)
    weights = pick_weights(golden.load("checkpoint_tiny.pth"), use_ema=True)
    model.load_state_dict(weights, strict=True)
    return model.eval(), post["bbox"], args


def _forward(model, post, factor, sizes, images=None, mask=None):
    """`models.inference.detect` as evaluation runs it, except that every query is CLIP-scored
    (`prune=False`); returns the outputs with `pred_logits` = the class scores, the detections and the
    transformer's input and output."""
    inputs = golden.load("inputs.pth")
    samples = NestedTensor(inputs["batch"], inputs["mask"]) if images is None else NestedTensor(images, mask)
    categories = inputs["eval_categories"]
    captured = {}
    hook = model.transformer.register_forward_hook(lambda m, i, o: captured.update(transformer=o, src=i[0]))
    try:
        detected = detect(model, samples, categories, postprocess=post, target_sizes=sizes, prune=False,
                          boost=resolve_boost(factor, NOVEL, len(categories)))
    finally:
        hook.remove()
    out = {**detected.outputs, "pred_logits": detected.outputs["class_logits"]}
    return out, detected.results, captured


def _check_outputs(out, ref_out, ref_anchor_index):
    assert out["scored_queries"].all()
    assert torch.equal(out["proposal_classes"], ref_out["proposal_classes"]), "pre-matched classes (sorted) differ"
    for b in range(out["anchor_index"].shape[0]):
        assert set(out["anchor_index"][b].tolist()) == set(ref_anchor_index[b].tolist())
    cls = golden.per_anchor(out["proposal_classes"], out["anchor_index"])
    ref_cls = golden.per_anchor(ref_out["proposal_classes"], ref_anchor_index)
    assert torch.equal(cls, ref_cls), "pre-matched class per anchor differs"
    boxes = golden.per_anchor(out["pred_boxes"], out["anchor_index"])
    ref_boxes = golden.per_anchor(ref_out["pred_boxes"], ref_anchor_index)
    assert (boxes - ref_boxes).abs().max() <= 1e-4
    scores = golden.per_anchor(out["pred_logits"].sigmoid(), out["anchor_index"])
    ref_scores = golden.per_anchor(ref_out["pred_logits"].sigmoid(), ref_anchor_index)
    assert ((scores - ref_scores).abs() <= 1e-5 + 1e-4 * ref_scores).all(), (scores - ref_scores).abs().max()
    for aux, ref_aux in zip(out["aux_outputs"], ref_out["aux_outputs"], strict=True):
        b = golden.per_anchor(aux["pred_boxes"], out["anchor_index"])
        rb = golden.per_anchor(ref_aux["pred_boxes"], ref_anchor_index)
        assert (b - rb).abs().max() <= 1e-4
        s = golden.per_anchor(aux["pred_logits"].sigmoid(), out["anchor_index"])
        rs = golden.per_anchor(ref_aux["pred_logits"].sigmoid(), ref_anchor_index)
        assert ((s - rs).abs() <= 1e-5 + 1e-4 * rs).all()


def _check_detections(results, ref_results, out, ref_out, ref_anchor_index, post, sizes, box_tol=1e-2):
    # The original's detections, traced back to their queries by our PostProcess on its outputs.
    ref_traced = post(ref_out, sizes)
    for b, (res, ref, traced) in enumerate(zip(results, ref_results, ref_traced)):
        assert torch.equal(traced["labels"], ref["labels"]) and torch.allclose(traced["boxes"], ref["boxes"])
        assert torch.equal(traced["scores"], ref["scores"])
        ours = {(int(a), int(lab)): (s, bx) for a, lab, s, bx in
                zip(out["anchor_index"][b][res["query_index"]], res["labels"], res["scores"], res["boxes"])}
        theirs = {(int(a), int(lab)): (s, bx) for a, lab, s, bx in
                  zip(ref_anchor_index[b][traced["query_index"]], ref["labels"], ref["scores"], ref["boxes"])}
        assert ours.keys() == theirs.keys(), "detections (anchor, label) differ"
        for key, (s, bx) in ours.items():
            rs, rbx = theirs[key]
            assert abs(s - rs) <= 1e-5 + 1e-4 * rs
            assert (bx - rbx).abs().max() <= box_tol
        assert list(ours) == list(theirs), "detections come out in another order"


@pytest.mark.parametrize("factor,name", [(8.0, "eval_tcf8.pth"), (1.0, "eval_tcf1.pth")])
def test_eval_batch_matches_original(tiny, factor, name):
    model, post, _ = tiny
    ref = golden.load(name)
    inputs = golden.load("inputs.pth")
    sizes = torch.stack([t["orig_size"] for t in inputs["targets"]])
    out, results, captured = _forward(model, post, factor, sizes)
    anchors = ref["anchor_index"]
    _check_outputs(out, ref["outputs"], anchors)

    inter = ref["intermediates"]
    golden.assert_close_rel(captured["src"], inter["input_proj"], what="input_proj")
    hs, references, memory = captured["transformer"]
    golden.assert_close_rel(memory, inter["transformer"]["memory"], what="memory")
    for name, ours in (("hs", hs), ("references", references)):
        # [L,B,Q,C] -> per image and anchor [B,Q,L*C]
        golden.assert_close_rel(golden.per_anchor(ours.permute(1, 2, 0, 3).flatten(2), out["anchor_index"]),
                                golden.per_anchor(inter["transformer"][name].permute(1, 2, 0, 3).flatten(2), anchors),
                                what=name)

    _check_detections(results, ref["results"], out, ref["outputs"], anchors, post, sizes)


def test_text_features_match_original(tiny):
    model, _, _ = tiny
    ref = golden.load("text_features.pth")
    for split in ("eval", "train"):
        emb = model.classifier(ref[f"{split}_categories"])
        assert (emb - ref[split]).abs().max() <= 1e-5


def test_backbone_features_and_positions_match_original(tiny):
    model, _, _ = tiny
    inputs = golden.load("inputs.pth")
    inter = golden.load("eval_tcf8.pth")["intermediates"]
    with torch.no_grad():
        features, pos3 = model.backbone(NestedTensor(inputs["batch"], inputs["mask"]))
    for name in ("layer3", "layer4"):
        ref = inter["backbone_features"][name]
        golden.assert_close_rel(features[name].tensors, ref["tensors"], what=name)
        assert torch.equal(features[name].mask, ref["mask"])
    golden.assert_close_rel(pos3, inter["backbone_pos"]["layer3"], what="pos layer3")
    pos4 = model.backbone[1](features["layer4"].mask)
    golden.assert_close_rel(pos4, inter["backbone_pos"]["layer4"], what="pos layer4")


@pytest.mark.parametrize("photo", ["astronaut", "coffee"])
@pytest.mark.parametrize("factor", [8, 1])
def test_single_image_matches_original(tiny, photo, factor):
    """A batch of one (no padding), as a predictor computes it; coffee at factor 1 has an NMS pair
    5e-5 from the threshold, so its boxes must agree to ~1e-6."""
    model, post, _ = tiny
    ref = golden.load(f"eval_single_{photo}_tcf{factor}.pth")
    inputs = golden.load("inputs.pth")
    index = 0 if photo == "astronaut" else 1
    image = inputs["images"][index][None]
    sizes = torch.as_tensor(ref["orig_size"]).reshape(1, 2)
    out, results, _ = _forward(model, post, float(factor), sizes, image,
                               torch.zeros(1, *image.shape[-2:], dtype=torch.bool))
    _check_outputs(out, ref["outputs"], ref["anchor_index"])
    box_tol = 1e-6 * sizes.max().item() if (photo, factor) == ("coffee", 1) else 1e-2
    _check_detections(results, ref["results"], out, ref["outputs"], ref["anchor_index"], post, sizes,
                      box_tol=box_tol)
