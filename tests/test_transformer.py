"""models/transformer.py against the original's intermediates (golden eval files) and hand computation."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.mlp import MLP
from models.transformer import MultiheadAttentionNoInProj, Transformer, gen_sineembed_for_position
from tests import golden
from util.box_ops import inverse_sigmoid

TINY = dict(d_model=256, nhead=8, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=256, dropout=0.1)


def box_heads(num: int) -> nn.ModuleList:
    return nn.ModuleList(MLP(256, 256, 4, 3) for _ in range(num))


def sub_state_dict(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def tiny_model():
    """The golden miniature's transformer (with its box heads) and text_proj, EMA weights, eval mode."""
    state = golden.load("checkpoint_tiny.pth")["model_ema"]
    transformer = Transformer(**TINY)
    transformer.decoder.bbox_embed = box_heads(3)
    transformer.load_state_dict(sub_state_dict(state, "transformer."), strict=True)
    text_proj = MLP(64, 128, 256, 2)
    text_proj.load_state_dict(sub_state_dict(state, "text_proj."), strict=True)
    return transformer.eval(), text_proj.eval(), state


def golden_inputs(eval_file: dict, state: dict, text_proj: MLP):
    inter = eval_file["intermediates"]
    src = inter["input_proj"]
    mask = inter["backbone_features"]["layer3"]["mask"]
    pos = inter["backbone_pos"]["layer3"]
    anchors = state["query_embed.weight"]
    refpoints = anchors[eval_file["anchor_index"]].transpose(0, 1)  # [Q,B,4]
    with torch.no_grad():
        class_queries = text_proj(eval_file["text_features"])  # [C,256]
    tgt = class_queries[eval_file["outputs"]["proposal_classes"]].transpose(0, 1)  # [Q,B,256]
    return src, mask, refpoints, pos, tgt


def max_diff_within(actual: torch.Tensor, expected: torch.Tensor, what: str) -> float:
    """The README's rule for intermediates: max |a - e| <= 1e-4 * max|e| + 1e-5; returns the diff."""
    assert actual.shape == expected.shape, f"{what}: {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item()
    bound = 1e-4 * expected.abs().max().item() + 1e-5
    assert diff <= bound, f"{what}: max abs diff {diff:.3g} > {bound:.3g}"
    return diff


@pytest.mark.parametrize("name", ["eval_tcf8.pth", "eval_tcf1.pth"])
def test_golden_eval_forward(tiny_model, name):
    transformer, text_proj, state = tiny_model
    ev = golden.load(name)
    expected = ev["intermediates"]["transformer"]
    with torch.no_grad():
        hs, references, memory = transformer(*golden_inputs(ev, state, text_proj))

    # the golden query order is the order of anchor_index, so positions correspond one to one
    max_diff_within(memory, expected["memory"], "memory")
    max_diff_within(hs, expected["hs"], "hs")
    max_diff_within(references, expected["references"], "references")
    assert (references[0] - ev["outputs"]["proposal"].transpose(0, 1)).abs().max() <= 1e-6

    # the detector's box outputs: normalised hs, head inverse_sigmoid eps 1e-5
    with torch.no_grad():
        boxes = [(transformer.decoder.bbox_embed[i](hs[i]) + inverse_sigmoid(references[i], eps=1e-5)).sigmoid()
                 for i in range(3)]
    outputs = ev["outputs"]
    assert (boxes[2] - outputs["pred_boxes"]).abs().max() <= 1e-4
    for i in range(2):
        assert (boxes[i] - outputs["aux_outputs"][i]["pred_boxes"]).abs().max() <= 1e-4


def test_gen_sineembed_single_point():
    cx, cy, w, h = 0.3, 0.7, 0.2, 0.55
    got = gen_sineembed_for_position(torch.tensor([[[cx, cy, w, h]]]))
    assert got.shape == (1, 1, 512)
    expected = []
    for v in (cy, cx, w, h):  # y first
        for k in range(128):
            arg = v * 2 * math.pi / 10000 ** (2 * (k // 2) / 128)
            expected.append(math.sin(arg) if k % 2 == 0 else math.cos(arg))
    torch.testing.assert_close(got[0, 0], torch.tensor(expected), atol=2e-6, rtol=0)
    # 2-d points embed (y, x) only
    got_xy = gen_sineembed_for_position(torch.tensor([[[cx, cy]]]))
    torch.testing.assert_close(got_xy[0, 0], torch.tensor(expected[:256]), atol=2e-6, rtol=0)


def test_attention_without_in_projection_matches_explicit_softmax():
    """Cross-attention shapes: 512-d q/k in 8 heads (dim 64, scale 1/8), 256-d values (dim 32), padded keys."""
    attn = MultiheadAttentionNoInProj(512, 8, vdim=256, dropout=0.1).eval()
    q, k, v = torch.randn(5, 2, 512), torch.randn(7, 2, 512), torch.randn(7, 2, 256)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    with torch.no_grad():
        got = attn(q, k, v, key_padding_mask=pad)
    heads_out = []
    for head in range(8):
        qh, kh = q[..., head * 64:(head + 1) * 64], k[..., head * 64:(head + 1) * 64]
        vh = v[..., head * 32:(head + 1) * 32]
        scores = torch.einsum("lbc,sbc->bls", qh, kh) / 8
        scores = scores.masked_fill(pad[:, None, :], float("-inf"))
        heads_out.append(torch.einsum("bls,sbc->lbc", scores.softmax(-1), vh))
    with torch.no_grad():
        expected = attn.out_proj(torch.cat(heads_out, dim=-1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(attn.out_proj.bias) == 0


def random_inputs(bs: int, queries: int, batch: int):
    h, w = 4, 5
    src, pos = torch.randn(bs, 256, h, w), torch.randn(bs, 256, h, w)
    mask = torch.zeros(bs, h, w, dtype=torch.bool)
    mask[1, :, 3:] = True
    mask[1, 3:, :] = True
    return src, mask, torch.randn(queries, batch, 4), pos, torch.randn(queries, batch, 256)


def small_transformer(dropout: float = 0.1) -> Transformer:
    model = Transformer(d_model=256, nhead=8, num_encoder_layers=2, num_decoder_layers=3, dim_feedforward=64,
                        dropout=dropout)
    model.decoder.bbox_embed = box_heads(3)
    return model


def test_split_class_halves_match_separate_runs():
    model = small_transformer().eval()
    src, mask, refpoints, pos, tgt = random_inputs(bs=2, queries=6, batch=4)
    with torch.no_grad():
        hs, refs, memory = model(src, mask, refpoints, pos, tgt)
        assert hs.shape == (3, 4, 6, 256) and refs.shape == (3, 4, 6, 4) and memory.shape == (20, 2, 256)
        for half in (slice(0, 2), slice(2, 4)):
            hs_h, refs_h, memory_h = model(src, mask, refpoints[:, half], pos, tgt[:, half])
            torch.testing.assert_close(memory, memory_h, atol=1e-6, rtol=0)
            torch.testing.assert_close(hs[:, half], hs_h, atol=1e-5, rtol=0)
            torch.testing.assert_close(refs[:, half], refs_h, atol=1e-6, rtol=0)


def test_references_keep_gradient_and_first_is_sigmoid_of_anchors():
    model = small_transformer(dropout=0.0).train()
    src, mask, refpoints, pos, tgt = random_inputs(bs=2, queries=6, batch=2)
    hs, refs, _ = model(src, mask, refpoints, pos, tgt)
    torch.testing.assert_close(refs[0], refpoints.sigmoid().transpose(0, 1))
    assert all(r.requires_grad for r in refs)
    refs[1].sum().backward()
    # refs[1] is layer 0's refinement: its box head gets a gradient, the later heads none (the
    # backward through torch.stack sends them zeros)
    assert model.decoder.bbox_embed[0].layers[2].weight.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for head in model.decoder.bbox_embed[1:] for p in head.parameters())


def test_next_layer_reference_is_detached():
    """Layer 1 starts from layer 0's boxes without gradient: refs[2] does not reach layer 0's box head."""
    model = small_transformer(dropout=0.0).train()
    _, refs, _ = model(*random_inputs(bs=2, queries=6, batch=2))
    refs[2].sum().backward()
    assert model.decoder.bbox_embed[1].layers[2].weight.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in model.decoder.bbox_embed[0].parameters())


def test_dropout_is_active_only_in_training():
    model = small_transformer(dropout=0.5)
    inputs = random_inputs(bs=2, queries=6, batch=2)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(*inputs)[0], model(*inputs)[0])
        model.train()
        assert not torch.allclose(model(*inputs)[0], model(*inputs)[0])


def test_initialisation():
    model = Transformer(**TINY)
    for name, p in model.named_parameters():
        if name.endswith("activation.weight"):
            assert p.shape == (1,) and p.item() == 0.25, name
        if p.dim() > 1:
            # Xavier-uniform bound; PyTorch's default Linear init would stay below 1/sqrt(fan_in)
            fan_out, fan_in = p.shape
            bound = math.sqrt(6 / (fan_in + fan_out))
            assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound, name
    for layer in model.decoder.layers:
        assert torch.count_nonzero(layer.self_attn.out_proj.bias) == 0
        assert torch.count_nonzero(layer.cross_attn.out_proj.bias) == 0
    assert model.decoder.layers[0].ca_qpos_proj is not None
    assert all(layer.ca_qpos_proj is None for layer in model.decoder.layers[1:])


def golden_transformer_keys() -> list[tuple[str, tuple[int, ...]]]:
    entries = []
    with open(golden.path("state_dict_tiny.txt")) as f:
        for line in f:
            if line.startswith("#") or not line.startswith("transformer."):
                continue
            key, shape = line.split("\t")[:2]
            dims = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
            entries.append((key[len("transformer."):], dims))
    return entries


def test_state_dict_keys_and_shapes_match_original():
    expected = golden_transformer_keys()
    model = Transformer(**TINY)
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == [e for e in expected if not e[0].startswith("decoder.bbox_embed.")]
    model.decoder.bbox_embed = box_heads(3)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == expected
