"""Focused checks of the original's quirks (SPEC §10), with values computed by hand."""
import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d
from torchvision.ops import roi_align

from datasets.coco_ovd import BASE_CATIDS, COCO_OVD_CATEGORIES, COCO_OVD_NOVEL_INDICES, NOVEL_CATIDS, novel_indices_for
from models.backbone import PositionEmbeddingSine, valid_sizes
from models.clip import attention_pool
from models.inference import detect
from models.postprocess import PostProcess
from models.prematch import efficient_region_embeddings, prematch_anchors, resolve_boost
from models.region_head import detection_logits
from util.nested_tensor import NestedTensor


def _pool(grid=3, width=8, heads=2, out=4):
    torch.manual_seed(0)
    pool = AttentionPool2d(grid, width, heads, out)
    with torch.no_grad():
        for p in pool.parameters():
            p.normal_(0, 0.5)
    return pool


def _naive_attention(q, keys, values, heads):
    """One query `[E]` over keys/values `[L,E]`, heads by an explicit loop."""
    e = q.shape[0]
    d = e // heads
    out = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        w = torch.softmax(keys[:, sl] @ q[sl] / math.sqrt(d), dim=0)
        out.append(w @ values[:, sl])
    return torch.cat(out)


def test_efficient_pooling_excludes_mean_token_from_keys_and_projects_before_roialign():
    pool = _pool()
    fmap = torch.randn(1, 8, 5, 6)
    mask = torch.zeros(1, 5, 6, dtype=torch.bool)
    box = torch.tensor([[[0.4, 0.5, 0.5, 0.6]]])  # cxcywh, inside the map
    got = efficient_region_embeddings(pool, NestedTensor(fmap, mask), box)[0, 0]

    # by hand: RoI-align the projected maps at 3x3, query = mean q + PE[0]Wq, keys/values = 9 tokens + PE[1:]W
    xyxy = torch.tensor([[0, 0.15 * 6, 0.2 * 5, 0.65 * 6, 0.8 * 5]])
    proj = {n: F.linear(fmap.permute(0, 2, 3, 1), getattr(pool, f"{n}_proj").weight, getattr(pool, f"{n}_proj").bias)
            .permute(0, 3, 1, 2) for n in "qkv"}
    al = {n: roi_align(m, xyxy, (3, 3), 1.0, -1, True)[0].flatten(1).t() for n, m in proj.items()}  # [9,E]
    pe = pool.positional_embedding
    q = al["q"].mean(0) + pe[0] @ pool.q_proj.weight.t()
    k = al["k"] + pe[1:] @ pool.k_proj.weight.t()
    v = al["v"] + pe[1:] @ pool.v_proj.weight.t()
    expected = F.normalize(F.linear(_naive_attention(q, k, v, 2), pool.c_proj.weight, pool.c_proj.bias), dim=0)
    assert torch.allclose(got, expected, atol=1e-6)

    # CLIP's own pooling of the same RoI (mean token also a key/value) gives something else
    standard = F.normalize(attention_pool(pool, roi_align(fmap, xyxy, (3, 3), 1.0, -1, True))[0], dim=0)
    assert (standard - got).abs().max() > 1e-3


def test_efficient_pooling_bias_is_attenuated_outside_the_map():
    """Projection before RoIAlign: a box half outside the map sees zeros (not the bias) out there."""
    pool = _pool()
    fmap = torch.zeros(1, 8, 4, 4)  # all-zero features: projected maps are the biases everywhere
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    inside = efficient_region_embeddings(pool, NestedTensor(fmap, mask), torch.tensor([[[0.5, 0.5, 0.5, 0.5]]]))
    outside = efficient_region_embeddings(pool, NestedTensor(fmap, mask), torch.tensor([[[1.0, 0.5, 0.5, 0.5]]]))
    # projecting after RoIAlign would give identical results for any box on a zero map
    assert (inside - outside).abs().max() > 1e-3


def test_position_encoding_offsets_by_half_a_cell():
    pe = PositionEmbeddingSine(num_pos_feats=2, temperature=20)
    mask = torch.tensor([[[False, False, True]]])  # 1 row, 2 valid columns, 1 padded
    out = pe(mask)[0, :, 0]  # [4 channels, 3 columns]: (sin y, cos y, sin x, cos x)
    eps = 1e-6
    y = 0.5 / (0.5 + eps + 0.5) * 2 * math.pi
    for col, xc in enumerate([0.5, 1.5]):
        x = xc / (1.5 + eps + 0.5) * 2 * math.pi
        expected = torch.tensor([math.sin(y), math.cos(y), math.sin(x), math.cos(x)])
        assert torch.allclose(out[:, col], expected, atol=1e-6), col
    # The padded column has no valid row: y = -0.5 / ((-0.5 + 1e-6) + 0.5) * 2pi, a huge float32
    # whose sine depends on that exact rounding (the original's order of operations).
    half = torch.tensor(-0.5)
    y_pad = half / (half + eps + 0.5) * (2 * math.pi)
    assert y_pad.item() == pytest.approx(-3100422.25)
    assert out[0, 2].item() == pytest.approx(y_pad.sin().item(), abs=1e-6)


def test_valid_size_read_from_first_row_and_column():
    mask = torch.ones(2, 4, 5, dtype=torch.bool)
    mask[0, :3, :4] = False
    mask[1, :, :2] = False
    assert valid_sizes(mask).tolist() == [[4.0, 3.0], [2.0, 4.0]]


def test_eval_scores_are_softmax_with_zero_background_times_objectness():
    emb = F.normalize(torch.tensor([[[1.0, 0.0], [0.6, 0.8]]]), dim=-1)  # [1,2,2]
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    obj = torch.tensor([[[0.0], [2.0]]])
    scores = detection_logits(emb, text, obj).sigmoid()[0]
    for q, (cos, o) in enumerate([((1.0, 0.0), 0.0), ((0.6, 0.8), 2.0)]):
        z = [math.exp(100 * c) for c in cos] + [1.0]
        for c in range(2):
            # inverse_sigmoid(eps=1e-5) clamps the probability into [1e-5, 1 - 1e-5]
            expected = min(max(z[c] / sum(z) / (1 + math.exp(-o)), 1e-5), 1 - 1e-5)
            assert scores[q, c].item() == pytest.approx(expected, rel=1e-4, abs=1e-9)


def _prematch_inputs(num_classes):
    pool = _pool(grid=2, width=8, heads=2, out=4)
    fmap = torch.randn(1, 8, 4, 4)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    anchors = torch.randn(6, 4)
    roi = efficient_region_embeddings(pool, NestedTensor(fmap, mask), anchors.sigmoid()[None])[0]
    return pool, NestedTensor(fmap, mask), anchors, roi


def test_prematch_softmax_with_background_and_novel_boost():
    pool, layer4, anchors, roi = _prematch_inputs(65)
    # text rows: class 0 = the RoI of anchor 0 itself (cos 1), a novel class slightly below it
    text = F.normalize(torch.randn(65, 4), dim=-1) * 0.01
    text[0] = roi[0]
    novel = COCO_OVD_NOVEL_INDICES[0]
    text[novel] = roi[0] * 0.99  # cos 0.99: softmax(100x) ratio e^-1 ≈ 0.37, x8 ≈ 2.9 > 1
    text = text
    plain = prematch_anchors(anchors, layer4, pool, text)
    boosted = prematch_anchors(anchors, layer4, pool, text, boost=resolve_boost(8.0, COCO_OVD_NOVEL_INDICES, 65))
    pos_plain = (plain.anchor_index[0] == 0).nonzero().item()
    pos_boost = (boosted.anchor_index[0] == 0).nonzero().item()
    assert plain.classes[0, pos_plain] == 0
    assert boosted.classes[0, pos_boost] == novel
    # classes come out sorted, and the anchors are reordered with them
    assert torch.equal(plain.classes, plain.classes.sort(dim=-1).values)
    assert torch.equal(plain.refpoints[:, 0], anchors[plain.anchor_index[0]])


def test_prematch_split_halves_see_complementary_classes():
    pool, layer4, anchors, roi = _prematch_inputs(4)
    text = F.normalize(torch.randn(4, 4), dim=-1)
    split = torch.tensor([False, True, False, True])
    res = prematch_anchors(anchors, layer4, pool, text, split_mask=split)
    assert res.classes.shape == (2, 6)
    # zeroed rows give cosine 0 against ~1 for others; with ×100 softmax they lose unless all available are negative
    sims = roi @ text.t()
    for half, available in ((0, ~split), (1, split)):
        expect = torch.where(available, sims, torch.zeros_like(sims)).argmax(-1)
        got = torch.empty_like(expect)
        got[res.anchor_index[half]] = res.classes[half]
        assert torch.equal(got, expect)


def test_coco_ovd_split_is_the_originals():
    """SPEC §2.2: the hard-coded novel label indices and the base / novel COCO id lists of the original."""
    assert COCO_OVD_NOVEL_INDICES == (4, 5, 11, 12, 15, 16, 21, 23, 27, 29, 32, 34, 45, 47, 54, 58, 63)
    assert sorted(NOVEL_CATIDS) == sorted((28, 21, 47, 6, 76, 41, 18, 63, 32, 36, 81, 22, 61, 87, 5, 17, 49))
    assert sorted(BASE_CATIDS) == sorted((70, 2, 53, 7, 73, 57, 4, 79, 62, 74, 9, 38, 20, 19, 54, 85, 72, 27, 80, 51,
                                          78, 15, 84, 55, 16, 59, 48, 34, 23, 86, 90, 50, 25, 31, 56, 82, 75, 42, 3,
                                          65, 52, 60, 35, 1, 8, 44, 33, 24))
    assert len(COCO_OVD_CATEGORIES) == 65 and COCO_OVD_CATEGORIES[63] == "scissors"


def test_target_class_factor_needs_a_known_vocabulary():
    assert novel_indices_for(list(COCO_OVD_CATEGORIES)) == COCO_OVD_NOVEL_INDICES
    assert novel_indices_for(["cat", "dog"]) is None
    assert resolve_boost(1.0, None, 2) is None  # factor 1: no boost, whatever the vocabulary
    with pytest.raises(ValueError, match="target_class_factor 8.0 boosts the novel classes"):
        resolve_boost(8.0, None, 2, what="the val json x.json")
    with pytest.raises(ValueError, match=r"novel indices \[5\] are not indices into"):
        resolve_boost(8.0, [1, 5], 3)
    assert resolve_boost(8.0, [1], 3).indices == (1,)


def test_without_anchor_pre_matching_queries_are_class_agnostic():
    """--anchor_pre_matching / --condition_on_text off (the original's defaults): anchors keep their order, content
    queries are zeros, so the boxes and objectness do not depend on the vocabulary; only eval's region scores do."""
    from models import build_model
    from tests import golden

    torch.manual_seed(0)
    images = [torch.randn(3, 64, 96), torch.randn(3, 80, 64)]
    vocabularies = (["cat", "dog"], ["a red star", "bicycle", "tree"])
    model, _, _ = build_model(golden.model_args(anchor_pre_matching=False, condition_on_text=False))
    with torch.no_grad():
        torch.nn.init.normal_(model.text_proj.layers[-1].weight)  # a conditioning that would show if it were used
        model.train()
        train_outs = []
        for vocabulary in vocabularies:
            torch.manual_seed(1)  # the same dropout
            train_outs.append(model(images, categories=vocabulary))
        model.eval()
        sizes = torch.tensor([[64, 96], [80, 64]])
        eval_outs = [detect(model, images, v, postprocess=PostProcess(), target_sizes=sizes).outputs
                     for v in vocabularies]
    for out in train_outs + eval_outs:
        assert "proposal_classes" not in out and all("proposal_classes" not in aux for aux in out["aux_outputs"])
        assert torch.equal(out["anchor_index"], torch.arange(out["anchor_index"].shape[1]).expand(2, -1))
    torch.testing.assert_close(train_outs[0]["pred_boxes"], train_outs[1]["pred_boxes"], rtol=0, atol=0)
    torch.testing.assert_close(train_outs[0]["pred_logits"], train_outs[1]["pred_logits"], rtol=0, atol=0)
    torch.testing.assert_close(eval_outs[0]["pred_boxes"], eval_outs[1]["pred_boxes"], rtol=0, atol=0)
    assert eval_outs[0]["class_logits"].shape[-1] == 2 and eval_outs[1]["class_logits"].shape[-1] == 3
    with pytest.raises(ValueError, match="split_class"):
        model.train()
        model(images, categories=vocabularies[0], split_class=True)

    # the same weights with pre-matching: the vocabulary moves the boxes (anchors re-sorted, text-conditioned)
    matched, _, _ = build_model(golden.model_args(target_class_factor=1.0))
    matched.load_state_dict(model.state_dict())
    matched.eval()
    with torch.no_grad():
        boxes = [matched(images, categories=v)["pred_boxes"] for v in vocabularies]
    assert not torch.allclose(boxes[0], boxes[1])


def test_split_class_without_pre_matching_is_refused_at_start(tmp_path):
    import main as cora_main

    args = cora_main.get_args_parser().parse_args(["--split_class_p", "0.2", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--split_class_p 0.2 needs --anchor_pre_matching"):
        cora_main.main(args)
