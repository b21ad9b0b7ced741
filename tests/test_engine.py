"""The training loop's own rules: the split-class schedule and stopping on a non-finite loss."""
import pytest
import torch

from engine import split_decision, train_one_epoch
from models import build_model
from tests import golden
from util.nested_tensor import NestedTensor
from util.optim import build_optimizer
from util.run import NonFiniteLossError


def test_split_iterations_are_the_originals():
    # SPEC §3.7: with p = 0.2 the split iterations of every epoch start 1, 14, 18, 21, 28, ...
    splits = [i for i in range(80) if split_decision(i, 0.2)]
    assert splits == [1, 14, 18, 21, 28, 31, 32, 43, 49, 55, 57, 66, 67, 72, 79]
    assert not any(split_decision(i, 0.0) for i in range(100))


def test_split_decision_leaves_the_global_random_state_alone():
    import random

    random.seed(123)
    expected = [random.random() for _ in range(3)]
    random.seed(123)
    split_decision(5, 0.2)
    assert [random.random() for _ in range(3)] == expected


def test_non_finite_loss_stops_training_and_names_the_term():
    args = golden.model_args(dropout=0.0)
    model, criterion, _ = build_model(args)
    model.load_state_dict(golden.load("checkpoint_tiny.pth")["model"])
    inputs = golden.load("inputs.pth")
    targets = [{"boxes": t["boxes"], "labels": t["labels_train"], "image_id": t["image_id"],
                "orig_size": t["orig_size"], "size": t["size"]} for t in inputs["targets"]]
    batch = (NestedTensor(inputs["batch"], inputs["mask"]), targets)
    forward = criterion.forward

    def poisoned(outputs, targets):
        losses = forward(outputs, targets)
        losses["loss_giou_1"] = losses["loss_giou_1"] * float("nan")
        return losses

    criterion.forward = poisoned
    optimizer, _ = build_optimizer(model, lr=1e-4, weight_decay=1e-4, lr_drop=35)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="loss_giou_1"):
        train_one_epoch(model, criterion, [batch], optimizer, torch.device("cpu"), 0,
                        categories=inputs["train_categories"])
    # stopped before the optimizer step: the weights are those of the last good state
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
