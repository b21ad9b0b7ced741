"""One training iteration against the original's (../shared/golden/train_step*.pth)."""
import pytest
import torch

from models import build_model
from models.criterion import class_agnostic_targets
from tests import golden
from util.ema import ModelEMA
from util.nested_tensor import NestedTensor
from util.optim import build_optimizer


def _targets(inputs_name):
    inputs = golden.load(inputs_name)
    return [{"boxes": t["boxes"], "labels": t["labels_train"], "image_id": t["image_id"],
             "orig_size": t["orig_size"], "size": t["size"]} for t in inputs["targets"]]


def _run_step(inputs_name, split, monkeypatch):
    ref_name = {("inputs.pth", False): "train_step.pth", ("inputs.pth", True): "train_step_split.pth",
                ("inputs_empty_target.pth", False): "train_step_empty_target.pth"}[(inputs_name, split)]
    ref = golden.load(ref_name)
    args = golden.model_args(dropout=0.0)
    model, criterion, _ = build_model(args)
    model.load_state_dict(golden.load("checkpoint_tiny.pth")["model"], strict=True)
    model.train()
    ema = ModelEMA(model, args.model_ema_decay)
    optimizer, _ = build_optimizer(model, lr=args.lr, weight_decay=args.weight_decay, lr_drop=args.lr_drop)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if split:
        monkeypatch.setattr(torch, "rand_like", lambda t, **kw: ref["rand_like"][0].to(t))
    inputs = golden.load("inputs.pth")
    targets = _targets(inputs_name)
    if split:
        targets = targets + [dict(t) for t in targets]
    outputs = model(NestedTensor(inputs["batch"], inputs["mask"]), categories=inputs["train_categories"],
                    split_class=split)
    crit_targets = class_agnostic_targets(targets)
    loss_dict = criterion(outputs, crit_targets)
    indices = [criterion.matcher(outputs, crit_targets)] + [criterion.matcher(aux, crit_targets)
                                                            for aux in outputs["aux_outputs"]]
    weighted = sum(loss_dict[k] * criterion.weight_dict[k] for k in loss_dict if k in criterion.weight_dict)
    optimizer.zero_grad()
    weighted.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_max_norm)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    ema.update(model)
    return dict(ref=ref, outputs=outputs, loss_dict=loss_dict, weighted=weighted, indices=indices, norm=norm,
                grads=grads, before=before, after=model.state_dict(), ema=ema.state_dict())


def _rel_close(a, b, rel=1e-4, abs_=1e-6):
    return abs(a - b) <= max(rel * abs(b), abs_)


@pytest.mark.parametrize("inputs_name,split", [("inputs.pth", False), ("inputs.pth", True),
                                               ("inputs_empty_target.pth", False)])
def test_train_step_matches_original(inputs_name, split, monkeypatch):
    r = _run_step(inputs_name, split, monkeypatch)
    ref, out = r["ref"], r["outputs"]
    # pre-matching and matching, per anchor
    assert torch.equal(out["proposal_classes"], ref["outputs"]["proposal_classes"])
    for layer, (ours, theirs) in enumerate(zip(r["indices"], ref["matcher_indices"], strict=True)):
        for b, ((q, t), (rq, rt)) in enumerate(zip(ours, theirs, strict=True)):
            got = {(int(out["anchor_index"][b, i]), int(j)) for i, j in zip(q, t)}
            want = {(int(ref["anchor_index"][b, i]), int(j)) for i, j in zip(rq, rt)}
            assert got == want, f"layer {layer} image {b}"
    for k, v in ref["loss_dict"].items():
        assert _rel_close(r["loss_dict"][k].item(), v.item()), (k, r["loss_dict"][k].item(), v.item())
    assert _rel_close(r["weighted"].item(), ref["weighted_loss"])
    assert _rel_close(r["norm"].item(), ref["grad_norm_before_clip"][0])

    gmax = ref["grad_max_abs"]
    zero = set(ref["zero_grad_tensors"])
    for name, stats in ref["grad_stats"].items():
        g = r["grads"][name].flatten()
        assert (g[stats["sample_index"]] - stats["sample_value"]).abs().max() <= 1e-3 * gmax, name
        if name in zero:
            assert g.norm() <= 1e-3 * gmax, name
        else:
            assert _rel_close(g.norm().item(), stats["l2"], rel=1e-3), (name, g.norm().item(), stats["l2"])
    for name, g in ref.get("grads", {}).items():
        assert (r["grads"][name] - g).abs().max() <= 1e-3 * gmax, name
    for name, stats in ref["param_update_stats"].items():
        delta = (r["after"][name] - r["before"][name]).flatten()
        assert (delta[stats["sample_index"]] - stats["sample_value"]).abs().max() <= 5e-6, name
    for name, stats in ref["ema_update_stats"].items():
        delta = (r["ema"][name] - r["before"][name]).flatten()
        assert (delta[stats["sample_index"]] - stats["sample_value"]).abs().max() <= 1e-9, name
