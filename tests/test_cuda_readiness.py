"""The CUDA path without a GPU: training, evaluation, PostProcess and the Predictor on an emulated CUDA device
(`tests.emulated_cuda.EmulatedCuda`: no device mixing, host syncs counted against a budget), a meta-device
training forward, a gradient for every trainable parameter under each config's flags, and the pieces that
keep host syncs off the hot paths (matcher, GIoU, text embeddings, pinned batches)."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import re
import shlex

import pytest
import torch
from torch.utils.data._utils.pin_memory import pin_memory

import engine
from main import get_args_parser
from models import ModelConfig, build_model
from models.assignment import scipy_assignment
from models.clip import build_text_classifier, read_clip_archive
from models.criterion import class_agnostic_targets
from models.inference import detect
from models.matcher import MASKED_COST, unmasked
from models.predictor import Predictor
from models.prematch import resolve_boost
from tests import golden
from tests.emulated_cuda import DeviceMixError, EmulatedCuda
from tests.helpers import cut_queries, golden_train_targets
from util import box_ops
from util.ema import ModelEMA
from util.nested_tensor import NestedTensor
from util.optim import build_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.device("cuda")


def _golden_batch() -> tuple[NestedTensor, tuple[dict, ...]]:
    inputs = golden.load("inputs.pth")
    return NestedTensor(inputs["batch"], inputs["mask"]), tuple(golden_train_targets())


def _small_model(**overrides):
    """The golden miniature model with its first 30 anchors (EMA weights), in eval mode."""
    model, criterion, post = build_model(golden.model_args(num_queries=30, **overrides))
    weights = dict(golden.load("checkpoint_tiny.pth")["model_ema"])
    cut_queries(weights)
    model.load_state_dict(weights)
    return model.eval(), criterion, post


# ---------------------------------------------------------------------------------------------- the emulation
def test_the_emulated_device_checks_devices_and_counts_syncs():
    real = torch.cuda.is_available()
    with EmulatedCuda() as cuda:
        assert torch.cuda.is_available() and torch.cuda.device_count() == 1
        x = torch.ones(4, 3, device="cuda")
        assert x.is_cuda and x.device == torch.device("cuda", 0) and not x.is_cpu
        assert (x + 1).is_cuda and x[1:].is_cuda and (x * torch.tensor(2.0)).is_cuda  # ops, views, CPU scalars
        with pytest.raises(DeviceMixError, match="cuda:0 and cpu"):
            x + torch.ones(4, 3)
        with pytest.raises(DeviceMixError):
            torch.cat([x, torch.zeros(1, 3)])
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()
        assert cuda.syncs == []
        assert x[torch.tensor([0, 2])].is_cuda  # CPU indices are allowed (CUDA copies them: a blocking copy)
        float(x.sum())
        x.tolist()
        assert not x.cpu().is_cuda
        x[x > 0].nonzero()
        assert cuda.counts() == {"h2d": 1, "d2h": 3, "size": 2}, cuda.syncs
        before = len(cuda.syncs)
        assert torch.ones(3).pin_memory().to("cuda", non_blocking=True).is_cuda  # asynchronous: not counted
        assert torch.ones(3).to("cuda", non_blocking=True).is_cuda  # pageable memory: a blocking copy
        assert cuda.counts(before) == {"h2d": 1}
        layer = torch.nn.Linear(3, 2).to("cuda")
        layer(x).sum().backward()  # backward runs on the device too
        assert layer.weight.is_cuda and layer.weight.grad.is_cuda
        assert copy.deepcopy(layer).bias.is_cuda
    assert torch.cuda.is_available() == real


# ---------------------------------------------------------------------------------------------- training
# Host syncs of one training iteration of the golden miniature model (2 images, 300 queries, 3 decoder
# layers, the torch solver that --matcher_backend auto picks on CUDA), measured after issue 18:
#   * everything but the solver, 3 (before: 47, 52 on a split-class iteration): the matcher's one copy of
#     which assignments are masked (all layers and images), the criterion's number of boxes (`.item()`),
#     the meters' one batched copy (engine.train_one_epoch). Gone: the matcher's copies per layer and image,
#     GIoU's degenerate-box checks, one `.item()` per meter, the repeat_interleave of the class gate;
#   * the batched assignment solver (models/assignment.py): its inf/NaN check, start, one sync per step of
#     the augmenting-path search and one copy of the solution: data-dependent, 19 on the first iteration of
#     the golden checkpoint, 12 later (unchanged by issue 18).
# Blocking copies to the device (each a stream sync on CUDA): 35 (36 on the first iteration; 47 split;
# before: 53 / 77), mostly the criterion indexing with the matcher's CPU indices, forward and backward. Gone:
# the text embeddings' copy (1203 x 1024 on LVIS) and the pageable batch (now pinned: NestedTensor.pin_memory).
OTHER_SYNC_BUDGET = 3
SOLVER_SYNC_BUDGET = 20
H2D_BUDGET = {0.0: 36, 1.0: 48}  # by split_class_p: plain, split-class (twice the images)


@pytest.mark.slow  # two training iterations of the golden model: about 30 s
def test_training_iterations_on_emulated_cuda_stay_within_the_sync_budget():
    model, criterion, _ = build_model(golden.model_args(dropout=0.0))
    model.load_state_dict(golden.load("checkpoint_tiny.pth")["model"])
    categories = golden.load("inputs.pth")["train_categories"]
    with EmulatedCuda() as cuda:
        model.to(CUDA)
        optimizer, _ = build_optimizer(model, lr=1e-4, weight_decay=1e-4, lr_drop=35)
        ema = ModelEMA(model, 0.9)
        batch = pin_memory(_golden_batch())  # what DataLoader(pin_memory=True) does with each batch
        assert batch[0].tensors.is_pinned() and batch[0].mask.is_pinned() and batch[1][0]["boxes"].is_pinned()

        def iteration(split_class_p: float) -> list[tuple[str, str]]:
            start = len(cuda.syncs)
            engine.train_one_epoch(model, criterion, [batch], optimizer, CUDA, 0, categories=categories,
                                   model_ema=ema, split_class_p=split_class_p)
            return cuda.syncs[start:]

        model.classifier(categories)  # the first forward encodes the names, stacked once on the device
        for split_class_p in (0.0, 1.0):  # a plain and a split-class iteration
            syncs = iteration(split_class_p)
            report = "\n".join(f"{kind}: {where}" for kind, where in syncs)
            host = [where for kind, where in syncs if kind != "h2d"]
            solver = [w for w in host if "models/assignment.py" in w]
            assert len(solver) <= SOLVER_SYNC_BUDGET, report
            assert len(host) - len(solver) <= OTHER_SYNC_BUDGET, report
            assert sum(kind == "h2d" for kind, _ in syncs) <= H2D_BUDGET[split_class_p], report
            assert not any(f in w for _, w in syncs for f in ("models/clip.py", "util/box_ops.py", "nested_tensor.py"))
        assert all(p.is_cuda for p in model.parameters()) and all(p.is_cuda for p in ema.module.parameters())
        assert all(s.is_cuda for group in optimizer.state.values() for k, s in group.items() if k != "step")


# ---------------------------------------------------------------------------------------------- evaluation
@pytest.mark.slow  # about 15 s
def test_detection_postprocess_and_predictor_on_emulated_cuda_equal_the_cpu():
    model, criterion, post = _small_model()
    inputs = golden.load("inputs.pth")
    samples = NestedTensor(inputs["batch"], inputs["mask"])
    categories = inputs["eval_categories"]
    sizes = torch.stack([t["orig_size"] for t in inputs["targets"]])
    boost = resolve_boost(8.0, list(range(17)), len(categories))
    photo, vocabulary = golden.path("photos/coffee_224x336.png"), ["cup", "spoon", "table"]
    reference = detect(model, samples, categories, postprocess=post["bbox"], target_sizes=sizes, boost=boost)
    [expected] = Predictor(model, device="cpu", disk_cache=False, resize=False).predict(photo, vocabulary)
    with EmulatedCuda():
        model.to(CUDA)
        got = detect(model, samples.to(CUDA), categories, postprocess=post["bbox"], target_sizes=sizes.to(CUDA),
                     boost=boost)
        # On a CUDA device the region head takes CUDA's route (torchvision's RoIAlign kernel, unpacked
        # convolutions, the larger pruning rounds): the same function, rounded differently.
        for mine, ref in zip(got.results, reference.results, strict=True):
            assert all(v.is_cuda for v in mine.values())
            assert torch.equal(mine["labels"].cpu(), ref["labels"])
            assert torch.equal(mine["query_index"].cpu(), ref["query_index"])
            torch.testing.assert_close(mine["scores"].cpu(), ref["scores"], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(mine["boxes"].cpu(), ref["boxes"], rtol=1e-5, atol=1e-4)
        # the losses evaluate() logs, on the device
        targets = class_agnostic_targets([{k: v.to(CUDA) if torch.is_tensor(v) else v for k, v in t.items()}
                                          for t in golden_train_targets()])
        assert all(v.is_cuda for v in criterion(got.outputs, targets).values())
        predictor = Predictor(model, device="cuda", disk_cache=False, resize=False)
        assert predictor.device.type == "cuda"
        [dets] = predictor.predict(photo, vocabulary)
    assert not dets.boxes.is_cuda  # Detections are CPU tensors, as documented
    assert dets.names == expected.names
    torch.testing.assert_close(dets.scores, expected.scores, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dets.boxes, expected.boxes, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------- meta device
def test_training_forward_on_the_meta_device(monkeypatch):
    """The training forward with the model and the inputs on `meta` (shapes only): a tensor made without
    `device=` would land on the CPU and fail to mix. It runs up to the matcher's cost matrices; the
    assignment solver and the losses after it read values, which meta tensors do not have."""
    model, criterion, _ = build_model(golden.model_args(dropout=0.0, num_queries=30))
    categories = golden.load("inputs.pth")["train_categories"]
    model.classifier(categories)  # the text tower needs values: the names are encoded on the CPU first
    model.to("meta").train()
    assert all(p.is_meta for p in model.parameters())
    # prematch turns autocast off around its pooling; autocast has no meta backend
    autocast = torch.autocast
    monkeypatch.setattr(torch, "autocast", lambda device_type, **kw: contextlib.nullcontext()
                        if device_type == "meta" else autocast(device_type, **kw))
    samples, targets = _golden_batch()
    samples = samples.to("meta")
    targets = class_agnostic_targets([{k: v.to("meta") if torch.is_tensor(v) else v for k, v in t.items()}
                                      for t in targets])
    for split in (False, True):
        out = model(samples, categories, split_class=split)
        b = 4 if split else 2
        assert out["pred_boxes"].shape == (b, 30, 4) and out["pred_boxes"].is_meta
        assert out["pred_logits"].shape == (b, 30, 1) and out["proposal_classes"].shape == (b, 30)
        assert len(out["aux_outputs"]) == 2 and out["text_features"].is_meta
        layer_targets = targets + targets if split else targets
        costs = criterion.matcher.cost_matrices(out, layer_targets)
        assert [tuple(c.shape) for c in costs] == [(30, len(t["boxes"])) for t in layer_targets]
        assert all(c.is_meta for c in costs)


# ---------------------------------------------------------------------------------------------- gradients
def _config_argv(path: str, **env: str) -> list[str]:
    """A config script's main.py flags, its shell variables replaced by `env`."""
    text = open(os.path.join(ROOT, path)).read()
    block = re.search(r'args="(.*?)"', text, re.S).group(1).replace("\\\n", " ")
    block = re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), "/tmp/" + m.group(1)), block)
    return shlex.split(block)


APM = "--anchor_pre_matching --remove_misclassified --condition_on_text --split_class_p 0.2"
CONFIGS = {
    "COCO R50": ("configs/COCO/R50_dab_ovd_3enc_apm128_splcls0.2_relabel_noinit.sh", {}),
    "COCO R50x4": ("configs/COCO/R50x4_dab_ovd_3enc_apm128_splcls0.2_relabel_noinit.sh", {}),
    "LVIS R50": ("configs/LVIS/R50_dab_ovd_3enc_apm128_splcls0.2_relabel_noinit.sh", {}),
    "LVIS R50x4": ("configs/LVIS/R50x4_dab_ovd_3enc_apm128_splcls0.2_relabel_noinit.sh", {}),
    "toy": ("configs/toy/toy_dab_ovd_apm_splcls0.2_relabel.sh", {"method": APM, "label_version": "RN50base"}),
    "toy apm=0": ("configs/toy/toy_dab_ovd_apm_splcls0.2_relabel.sh", {"method": "", "label_version": "RN50base"}),
}


_UNUSED: dict[tuple, dict[bool, list[str]]] = {}  # configs with the same network flags are run once


def _unused_parameters(cfg: ModelConfig, split_class: bool) -> dict[bool, list[str]]:
    """Per iteration kind (split-class or not), the trainable parameters without a gradient after backward."""
    # the CLIP archive (not the backbone's name) gives the architecture; evaluation settings play no part
    key = (dataclasses.replace(cfg, backbone="", use_nms=False, max_detections=0, target_class_factor=1.0), split_class)
    if key in _UNUSED:
        return _UNUSED[key]
    model, criterion, _ = build_model(cfg)
    model.train()
    samples, targets = _golden_batch()
    samples = NestedTensor(samples.tensors[..., :128, :160], samples.mask[..., :128, :160])  # smaller, faster
    categories = golden.load("inputs.pth")["train_categories"]
    unused = _UNUSED[key] = {}
    for split in ([False, True] if split_class else [False]):
        model.zero_grad(set_to_none=True)
        out = model(samples, categories, split_class=split)
        losses = criterion(out, class_agnostic_targets(list(targets) * (2 if split else 1)))
        sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses).backward()
        unused[split] = sorted(n for n, p in model.named_parameters() if p.requires_grad and p.grad is None)
    assert any(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith(("backbone.0.body.",
                                                                                          "classifier.")))
    return unused


@pytest.mark.parametrize("name", CONFIGS)
def test_every_trainable_parameter_gets_a_gradient(name):
    """main.py wraps the model in DDP with find_unused_parameters=False exactly when anchor pre-matching and
    text conditioning are on: then every trainable parameter must get a gradient on every iteration (plain and
    split-class); without them text_proj is the one unused module. Each config's flags at miniature sizes."""
    path, env = CONFIGS[name]
    args = get_args_parser().parse_args(_config_argv(path, **env))
    args.model_path, args.region_prompt_path = golden.path("clip_tiny.pt"), golden.path("region_prompt_tiny.pth")
    args.text_dim, args.num_queries, args.enc_layers, args.dec_layers, args.dim_feedforward = 64, 20, 1, 2, 32
    cfg = ModelConfig.from_args(args)
    static_graph = cfg.anchor_pre_matching and cfg.condition_on_text  # main.py's DDP guard
    for split, unused in _unused_parameters(cfg, args.split_class_p > 0).items():
        if static_graph:
            assert unused == [], (name, split, unused)
        else:
            assert unused and all(n.startswith("text_proj.") for n in unused), (name, unused)


# ---------------------------------------------------------------------------------------------- the pieces
def test_matcher_reads_the_masked_pairs_of_all_layers_in_one_copy():
    gen = torch.Generator().manual_seed(0)
    costs = [torch.rand(12, t, generator=gen) for t in (3, 0, 5, 1)]
    costs[0][:, 1] = MASKED_COST
    costs[2][4, :] = MASKED_COST
    solutions = scipy_assignment(costs)
    expected = [c[rows, cols] < MASKED_COST for c, (rows, cols) in zip(costs, solutions)]
    got = unmasked(costs, solutions)
    assert [k.tolist() for k in got] == [k.tolist() for k in expected]
    assert not got[0].all() and got[1].numel() == 0
    with EmulatedCuda() as cuda:
        on_device = [c.to(CUDA) for c in costs]
        start = len(cuda.syncs)
        got = unmasked(on_device, solutions)
        assert cuda.counts(start) == {"d2h": 1}, cuda.syncs[start:]  # pinned indices go up asynchronously
        assert not any(k.is_cuda for k in got)
        assert [k.tolist() for k in got] == [k.tolist() for k in expected]
        assert unmasked([c[:, :0] for c in on_device], [(r[:0], r[:0]) for r, _ in solutions])[0].numel() == 0
        assert cuda.counts(start) == {"d2h": 1}, "no assignment: nothing to read"


def test_giou_checks_degenerate_boxes_on_the_cpu_only(monkeypatch):
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    bad = torch.tensor([[0.5, 0.0, 0.2, 1.0]])
    with pytest.raises(ValueError, match="boxes1 has degenerate boxes"):
        box_ops.generalized_box_iou(bad, good)
    with pytest.raises(ValueError, match="boxes2 has degenerate boxes"):
        box_ops.generalized_box_iou(good, torch.tensor([[float("nan")] * 4]))
    with EmulatedCuda() as cuda:
        box_ops.generalized_box_iou(bad.to(CUDA), good.to(CUDA))  # no check, no sync on the GPU
        start = len(cuda.syncs)
        assert box_ops.generalized_box_iou(good.to(CUDA), good.to(CUDA)).is_cuda
        assert cuda.counts(start) == {"h2d": 2}
        monkeypatch.setattr(box_ops, "CHECK_BOXES_ON_DEVICE", True)  # CORA_CHECK_BOXES=1
        with pytest.raises(ValueError, match="degenerate"):
            box_ops.generalized_box_iou(bad.to(CUDA), good.to(CUDA))


def test_text_classifier_keeps_each_vocabulary_stacked_on_the_device():
    arch, state = read_clip_archive(golden.path("clip_tiny.pt"))
    classifier = build_text_classifier(arch, 15, state)
    names, other = ["cat", "dog", "remote control"], ["dog", "cat"]
    with EmulatedCuda() as cuda:
        classifier.to(CUDA)
        first = classifier(names)
        assert first.is_cuda and first.shape == (3, arch.output_dim)
        start = len(cuda.syncs)
        assert classifier(names) is first and classifier(list(names)) is first  # reused, no copy
        assert cuda.syncs[start:] == []
        assert torch.equal(classifier(other), first[[1, 0]])  # another vocabulary: stacked from the name cache
        ema_copy = copy.deepcopy(classifier)  # the EMA's copy keeps its own, on the device
        assert ema_copy(names).is_cuda and ema_copy(names) is ema_copy(names)
        classifier.to("cpu")  # a move drops the stacked tensors
        assert not classifier(names).is_cuda
        again = classifier(names)
        classifier.load_state_dict(classifier.state_dict())  # loading weights drops everything
        assert classifier(names) is not again and not classifier.cache.keys() - set(names)
    for i in range(classifier.VOCABULARIES_KEPT + 2):  # a bounded number of vocabularies is kept
        classifier(names[: 1 + i % 3] + [f"thing {i}"])
    assert len(classifier._stacked) == classifier.VOCABULARIES_KEPT


def test_nested_tensor_pin_memory_reaches_the_device_asynchronously():
    samples = NestedTensor(torch.rand(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.bool))
    with EmulatedCuda() as cuda:
        pinned, targets = pin_memory((samples, ({"boxes": torch.rand(2, 4), "names": ["a", "b"]},)))
        assert pinned.tensors.is_pinned() and pinned.mask.is_pinned() and targets[0]["names"] == ["a", "b"]
        moved = pinned.to(CUDA, non_blocking=True)
        assert moved.tensors.is_cuda and moved.mask.is_cuda and cuda.syncs == []
        assert torch.equal(moved.tensors.cpu(), samples.tensors)
    assert NestedTensor(samples.tensors, None).to("cpu").mask is None
