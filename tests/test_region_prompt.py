"""Region prompting (tools/region_prompt.py) against the original's training step, by hand, and end to end."""
import json
import math
import os
import re
import shlex

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

import tools.region_prompt as rp
from datasets.coco_ovd import NOVEL_CATIDS
from datasets.transforms import make_coco_transforms
from models import build_model
from models.clip import build_text_classifier, load_region_prompt, read_clip_archive
from models.inference import detect
from models.postprocess import PostProcess
from tests import golden
from tests.tiny_coco import make_tiny_coco
from util.checkpoint import load_checkpoint
from util.nested_tensor import NestedTensor, collate_fn, nested_tensor_from_tensor_list


@pytest.fixture(scope="module")
def clip():
    return read_clip_archive(golden.path("clip_tiny.pt"))


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """The tiny COCO-OVD data, plus `small_train.json`: its first two training images with boxes."""
    info = make_tiny_coco(tmp_path_factory.mktemp("coco"))
    train = info["gt"]["train"]
    keep = [785, 139]
    small = dict(train, images=[i for i in train["images"] if i["id"] in keep],
                 annotations=[a for a in train["annotations"] if a["image_id"] in keep])
    (info["root"] / "annotations" / "small_train.json").write_text(json.dumps(small))
    return info


def _golden_step(clip, optimizer_lr=1e-4):
    arch, sd = clip
    step, inputs = golden.load("region_prompt_step.pth"), golden.load("inputs.pth")
    model = rp.build_region_classifier(arch, sd, trainable_prompt=True)
    text = rp.text_embeddings(build_text_classifier(arch, step["text_len"], sd), inputs["train_categories"])
    optimizer = torch.optim.AdamW([model.positional_embedding], lr=optimizer_lr, weight_decay=step["weight_decay"])
    targets = [{"boxes": t["boxes"], "labels": t["labels_train"]} for t in inputs["targets"]]
    before = model.positional_embedding.detach().clone()
    # the padded batch with its mask, as the original's loader hands it over
    out = rp.train_step(model, optimizer, NestedTensor(inputs["batch"], inputs["mask"]), targets, text,
                        max_norm=step["clip_max_norm"])
    return step, model, out, before


def test_golden_training_step(clip):
    step, model, out, before = _golden_step(clip)
    assert step["lr_prompt"] == 1e-4 and step["text_len"] == 25 and step["clip_max_norm"] == 0.1
    assert step["trainable"] == ["backbone.0.attnpool.positional_embedding"]
    assert step["categories"] == golden.load("inputs.pth")["train_categories"]
    # the prompt starts as CLIP's positional embedding, bit for bit
    assert torch.equal(before, step["positional_embedding_before"])
    assert torch.equal(torch.cat([t["labels_train"] for t in golden.load("inputs.pth")["targets"]]), step["labels"])
    # logits: 100 x cosine, all 7 boxes in batch order
    assert out["logits"].shape == (7, 48)
    assert (out["logits"] - step["logits"]).abs().max() <= 1e-4
    # the loss is the mean cross-entropy over the batch's boxes
    assert torch.allclose(torch.nn.functional.cross_entropy(step["logits"], step["labels"]), step["loss"], rtol=1e-6)
    assert abs(out["loss"].item() - step["loss"].item()) <= 1e-5 * step["loss"].item()
    grad, ref_grad = model.positional_embedding.grad, step["grad_positional_embedding"]
    assert (grad - ref_grad).abs().max() <= 1e-3 * ref_grad.abs().max()
    assert abs(grad.norm().item() - 0.1) <= 1e-6  # clipped to norm 0.1
    assert (model.positional_embedding.detach() - step["positional_embedding_after"]).abs().max() <= 5e-6


def test_loss_of_a_hand_computed_case(clip, monkeypatch):
    """Two boxes with known embeddings and three classes: logits = 100 cos, loss = mean CE."""
    arch, sd = clip
    model = rp.build_region_classifier(arch, sd, trainable_prompt=True)
    emb = [[0.6, 0.0, 0.8], [0.0, 0.28, 0.96]]
    text = [[1.0, 0.0, 0.0], [0.0, 0.6, 0.8], [0.0, 0.8, 0.6]]
    labels = [2, 1]

    def fixed(trunk, layer3, boxes, chunk_size=512):
        assert [len(b) for b in boxes] == [1, 1]
        return torch.tensor(emb) + 0.0 * trunk.attn_pool.positional_embedding.sum()

    monkeypatch.setattr(rp, "region_embeddings", fixed)
    optimizer = torch.optim.AdamW([model.positional_embedding], lr=1e-4, weight_decay=1e-4)
    images = nested_tensor_from_tensor_list([torch.zeros(3, 64, 64), torch.zeros(3, 48, 64)])
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]]), "labels": torch.tensor([labels[0]])},
               {"boxes": torch.tensor([[0.4, 0.5, 0.2, 0.3]]), "labels": torch.tensor([labels[1]])}]
    out = rp.train_step(model, optimizer, images, targets, torch.tensor(text))

    expected_logits, losses = [], []
    for e, label in zip(emb, labels):
        logits = [100 * sum(a * b for a, b in zip(e, t)) for t in text]
        expected_logits.append(logits)
        losses.append(math.log(sum(math.exp(v) for v in logits)) - logits[label])
    # box 1: logits (60, 64, 48), label 2 -> 16 + log(1 + e^-4 + e^-16);
    # box 2: logits (0, 93.6, 80), label 1 -> log(1 + e^-93.6 + e^-13.6)
    assert torch.allclose(out["logits"], torch.tensor(expected_logits), atol=1e-4)
    assert torch.allclose(out["logits"], torch.tensor([[60.0, 64.0, 48.0], [0.0, 93.6, 80.0]]), atol=1e-4)
    assert out["loss"].item() == pytest.approx(sum(losses) / 2, rel=1e-6)
    assert out["loss"].item() == pytest.approx((16 + math.log(1 + math.exp(-4) + math.exp(-16))
                                                + math.log(1 + math.exp(-93.6) + math.exp(-13.6))) / 2, rel=1e-6)


def test_batch_without_boxes_is_a_zero_loss_step(clip):
    arch, sd = clip
    model = rp.build_region_classifier(arch, sd, trainable_prompt=True)
    optimizer = torch.optim.AdamW([model.positional_embedding], lr=1e-4, weight_decay=1e-4)
    images = nested_tensor_from_tensor_list([torch.zeros(3, 64, 64)])
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    out = rp.train_step(model, optimizer, images, empty, torch.eye(3, arch.output_dim))
    assert out["loss"].item() == 0.0 and out["num_boxes"].item() == 0
    assert torch.equal(model.positional_embedding.grad, torch.zeros_like(model.positional_embedding))
    assert optimizer.state[model.positional_embedding]["step"].item() == 1  # the step is still taken


def test_one_epoch_lowers_the_loss_and_trains_only_the_prompt(clip, coco):
    arch, sd = clip
    torch.manual_seed(0)
    model = rp.build_region_classifier(arch, sd, trainable_prompt=True)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    # a fixed batch: every training image with its boxes, val transform (deterministic)
    args = rp.get_args_parser().parse_args(["--coco_path", str(coco["root"]), "--train_json", "small_train.json"])
    val_set = rp.open_boxes(args, "train", make_coco_transforms("val", clip_normalisation=True))
    text = rp.text_embeddings(build_text_classifier(arch, 25, sd), val_set.category_list)
    items = [val_set[i] for i in rp.images_with_boxes(val_set)]
    samples, targets = collate_fn(items)
    boxes = [t["boxes"] for t in targets]
    labels = torch.cat([t["labels"] for t in targets])
    layer3 = model.layer3(samples)  # does not depend on the prompt

    def fixed_batch_loss():
        with torch.no_grad():
            return rp.region_prompt_loss(rp.region_logits(model.embed(layer3, boxes), text), labels).item()

    loss_before = fixed_batch_loss()
    train_set = rp.build_split(args, "train")
    sampler = DistributedSampler(train_set, num_replicas=1, rank=0, shuffle=True, seed=42)
    loader = DataLoader(train_set, batch_sampler=BatchSampler(sampler, 1, drop_last=True), collate_fn=collate_fn)
    # lr 1e-3 instead of 1e-4: two AdamW steps of 1e-4 barely move a random miniature CLIP
    optimizer = torch.optim.AdamW([model.positional_embedding], lr=1e-3, weight_decay=1e-4)
    stats = rp.train_one_epoch(model, loader, optimizer, text, torch.device("cpu"), 0)
    loss_after = fixed_batch_loss()
    assert math.isfinite(stats["loss"]) and stats["num_boxes"] > 0
    assert loss_after < loss_before - 1e-3, (loss_before, loss_after)

    state_after = model.state_dict()
    assert not torch.equal(state_after["trunk.attn_pool.positional_embedding"],
                           state_before["trunk.attn_pool.positional_embedding"])
    changed = [k for k, v in state_after.items() if k != "trunk.attn_pool.positional_embedding"
               and not torch.equal(v, state_before[k])]
    assert changed == []
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["trunk.attn_pool.positional_embedding"]


def _run(coco, tmp_path, *extra):
    argv = ["--coco_path", str(coco["root"]), "--train_json", "small_train.json", "--model_path",
            golden.path("clip_tiny.pt"), "--batch_size", "2", "--num_workers", "0", "--device", "cpu",
            "--output", str(tmp_path / "prompt.pth"), "--output_dir", str(tmp_path / "run"), *extra]
    return rp.main(rp.get_args_parser().parse_args(argv))


@pytest.fixture(scope="module")
def trained(coco, tmp_path_factory):
    """Two epochs straight (with the accuracy report), and the same run interrupted after epoch 0."""
    straight, resumed = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("resumed")
    result = _run(coco, straight, "--epochs", "2", "--lr_drop", "1")
    first = _run(coco, resumed, "--epochs", "1", "--lr_drop", "1", "--no_eval")
    second = _run(coco, resumed, "--epochs", "2", "--lr_drop", "1", "--no_eval")
    return {"straight": straight, "resumed": resumed, "result": result, "first": first, "second": second}


def test_export_checkpoint_log_and_exact_resume(trained, clip):
    straight, resumed = trained["straight"], trained["resumed"]
    arch, sd = clip
    prompt = load_region_prompt(str(straight / "prompt.pth"), arch)  # the localizer's loader accepts it
    assert list(prompt) == ["attnpool.positional_embedding"]
    assert prompt["attnpool.positional_embedding"].shape == (50, 256)
    assert not torch.equal(prompt["attnpool.positional_embedding"], sd["visual.attnpool.positional_embedding"].float())

    checkpoint = load_checkpoint(straight / "run" / "checkpoint.pth")
    assert checkpoint["epoch"] == 1 and checkpoint["lr_scheduler"]["last_epoch"] == 2
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-6)  # 1e-4, x0.1 twice (step 1)
    assert torch.equal(checkpoint["model"]["attnpool.positional_embedding"], prompt["attnpool.positional_embedding"])
    log = [json.loads(line) for line in (straight / "run" / "log.txt").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [0, 1] and all(math.isfinite(e["train_loss"]) for e in log)

    # stopped after epoch 0 and started again with the same command: continues at epoch 1, same result
    assert trained["first"]["epochs_run"] == 1 and trained["second"]["epochs_run"] == 1
    assert torch.equal(torch.load(resumed / "prompt.pth", weights_only=True)["attnpool.positional_embedding"],
                       prompt["attnpool.positional_embedding"])
    resumed_log = [json.loads(line) for line in (resumed / "run" / "log.txt").read_text().splitlines()]
    assert resumed_log == log


def test_accuracy_report(trained, coco):
    report = json.loads((trained["straight"] / "run" / "region_accuracy.json").read_text())
    assert report == json.loads(json.dumps(trained["result"]["accuracy"]))
    assert report["categories"] == 65
    val = coco["gt"]["val"]
    novel_ids = {c["id"] for c in val["categories"] if c["id"] in NOVEL_CATIDS}
    boxes = [a for a in val["annotations"] if not a["iscrowd"]]
    expected = {"base": sum(a["category_id"] not in novel_ids for a in boxes),
                "novel": sum(a["category_id"] in novel_ids for a in boxes)}
    names = ("CLIP (no prompt)", "region prompt")
    assert set(report["results"]) == {*names, *(name + rp.PREMATCH_SUFFIX for name in names)}
    for name in report["results"]:
        r = report["results"][name]
        assert r["boxes"]["base"] == expected["base"] and r["boxes"]["novel"] == expected["novel"]
        for split in ("base", "novel", "all"):
            assert r[split] == r["correct"][split] / r["boxes"][split]
    table = rp.accuracy_table(trained["result"]["accuracy"]["results"])
    assert table.startswith("| region classifier | base | novel | all |")


def test_exported_prompt_changes_the_localizer(trained):
    inputs = golden.load("inputs.pth")
    path = str(trained["straight"] / "prompt.pth")
    image = NestedTensor(inputs["images"][0][None], torch.zeros(1, 256, 256, dtype=torch.bool))
    outputs, weights = [], []
    for prompt_path in (path, ""):  # the exported prompt, then CLIP's own positional embedding
        torch.manual_seed(0)  # the same random localizer weights for both
        # a smaller model than the golden one (30 queries, 8 classes) keeps this test fast
        args = golden.model_args(region_prompt_path=prompt_path, num_queries=30, target_class_factor=1.0)
        model, _, _ = build_model(args)
        model.eval()
        outputs.append(detect(model, image, inputs["eval_categories"][:8], postprocess=PostProcess(),
                              target_sizes=torch.tensor([[256, 256]])).outputs)
        weights.append(model.state_dict())
    key = "backbone.0.attn_pool.positional_embedding"
    assert torch.equal(weights[0][key], torch.load(path, weights_only=True)["attnpool.positional_embedding"])
    assert [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])] == [key]
    assert (outputs[0]["class_logits"] - outputs[1]["class_logits"]).abs().max() > 1e-3


def test_errors_name_the_flag(coco, tmp_path):
    with pytest.raises(FileNotFoundError, match="--train_json missing.json"):
        _run(coco, tmp_path, "--train_json", "missing.json", "--epochs", "1")
    with pytest.raises(ValueError, match="fewer than one batch"):
        _run(coco, tmp_path, "--batch_size", "64", "--epochs", "1")


@pytest.mark.parametrize("variant,backbone", [("R50", "clip_RN50"), ("R50x4", "clip_RN50x4")])
def test_configs_hold_the_region_branch_values(variant, backbone):
    """configs/COCO/region_prompt_*.sh: the region branch's configs/COCO_RN50*.sh values, launched through
    configs/controller.sh with tools/region_prompt.py as the entry point."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "configs", "COCO", f"region_prompt_{variant}.sh")).read()
    assert "entry=tools/region_prompt.py\n" in text and text.index("entry=") < text.index(". configs/controller.sh")
    assert "${entry:-main.py}" in open(os.path.join(root, "configs", "controller.sh")).read()
    block = re.search(r'args="(.*?)"', text, re.S).group(1).replace("\\\n", " ")
    block = block.replace("$data_path", "/data/coco").replace("$work_dir", "/tmp/work")
    args = rp.get_args_parser().parse_args(shlex.split(block))
    assert (args.batch_size, args.epochs, args.lr_drop, args.lr_prompt, args.text_len) == (4, 5, 4, 1e-4, 25)
    assert (args.weight_decay, args.clip_max_norm) == (1e-4, 0.1)
    assert args.backbone == backbone and args.output == rp.default_prompt_path(backbone)
    assert args.output == f"logs/region_prompt_{variant}.pth"  # what the localizer config reads
    assert (args.coco_path, args.output_dir) == ("/data/coco", "/tmp/work")
