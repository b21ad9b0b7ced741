"""The miniature world (tools/toy): generator, COCO-OVD files, OpenAI-format CLIP archive, CLIP training.

    python -m pytest -q tests/test_toy.py
"""
from __future__ import annotations

import argparse
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from datasets import build_dataset, get_coco_api_from_dataset
from datasets.coco_ovd import BASE_CATIDS, NOVEL_CATIDS
from datasets.ovd_eval import CocoOVDEvaluator, ovd_split
from models.clip import build_text_classifier, build_visual, read_clip_archive, visual_state_dict
from tests.helpers import toy_dataset_args
from tools.toy import world
from tools.toy.clip_export import ToyCLIP, ToyCLIPConfig, export_archive, load_state_into
from tools.toy.make_dataset import image_rng, make_dataset
from tools.toy.train_clip import contrastive_loss, normalise, train

SMALL = dict(train=6, val=4, captions=12, test_per_class=1, image_size=128, crop_resolution=64, workers=1)
# Small enough to train in seconds; S=2 -> 64 px crops.
TINY_CLIP = ToyCLIPConfig(vision_width=8, attnpool_grid=2, output_dim=32, text_width=64, text_layers=1)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "toy_world.json"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy") / "seed0"
    make_dataset(out=root, seed=0, **SMALL)
    return root


def test_generator_is_deterministic_per_seed(toy, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    make_dataset(out=again, seed=0, **{**SMALL, "workers": 2})  # the worker count must not matter
    make_dataset(out=other, seed=1, **SMALL)
    reference = _digest(toy)
    assert any(k.startswith("train2017/") for k in reference) and "clip/captions_train.json" in reference
    assert _digest(again) == reference
    different = _digest(other)
    assert different.keys() == reference.keys()
    assert all(different[k] != reference[k] for k in reference if k.endswith(".jpg"))


def test_jsons_load_through_the_ovd_loader(toy):
    train, val = build_dataset("train", toy_dataset_args(toy)), build_dataset("val", toy_dataset_args(toy))
    assert train.category_list == list(world.BASE_NAMES)
    assert val.category_list == list(world.CLASS_NAMES)
    base_ids = {c.id for c in world.CLASSES if c.split == "base"}
    novel_ids = {c.id for c in world.CLASSES if c.split == "novel"}
    assert len(base_ids) == 12 and len(novel_ids) == 4
    assert {a["category_id"] for a in train.coco.dataset["annotations"]} <= base_ids
    assert len(train) == SMALL["train"] and len(val) == SMALL["val"]
    # every image is listed in the base json, boxes or not; the all-boxes json has the novel ones too
    every = json.loads((toy / "annotations" / "instances_train2017_all.json").read_text())
    assert [a for a in every["annotations"] if a["category_id"] in base_ids] == train.coco.dataset["annotations"]
    assert ovd_split(val.coco.dataset["categories"]) == (frozenset(base_ids), frozenset(novel_ids))
    image, target = val[0]
    assert image.shape[0] == 3 and target["labels"].numel() == len(val.coco.imgToAnns[val.ids[0]])


def test_evaluator_uses_the_json_split_and_keeps_coco_s(toy):
    val = build_dataset("val", toy_dataset_args(toy))
    evaluator = CocoOVDEvaluator(get_coco_api_from_dataset(val), val.label2catid, verbose=False)
    # ground truth as detections: every class present scores AP50 100
    for image_id in val.ids:
        anns = val.coco.imgToAnns[image_id]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([val.catid2label[a["category_id"]] for a in anns], dtype=torch.int64)
        evaluator.update({image_id: {"boxes": boxes, "labels": labels, "scores": torch.ones(len(anns))}})
    evaluator.accumulate()
    stats = evaluator.summarize()
    present = {a["category_id"] for a in val.coco.dataset["annotations"]}
    if present & evaluator.novel_catids:
        assert stats[13] == pytest.approx(100.0)
    assert stats[12] == pytest.approx(100.0)
    coco_like = [{"id": c, "name": str(c)} for c in (*BASE_CATIDS, *NOVEL_CATIDS)]
    assert ovd_split(coco_like) == (frozenset(BASE_CATIDS), frozenset(NOVEL_CATIDS))
    with pytest.raises(ValueError, match="split"):
        ovd_split([{"id": 1, "name": "a", "split": "rare"}])


def test_boxes_are_the_extent_of_the_drawn_pixels():
    for index in range(20):
        rng = image_rng(0, "val", index)
        canvas = world.background(rng, 128, 128)
        drawn = canvas.copy()
        objects = world.place_objects(rng, drawn, ["star", "ring", "crescent"][: 1 + index % 3], size_range=(20, 60))
        changed = np.any(drawn != canvas, axis=-1)
        assert np.array_equal(changed, np.any([o.mask for o in objects], axis=0))
        if len(objects) == 1:  # a single object: its box tightly covers the non-background pixels
            ys, xs = np.nonzero(changed)
            assert objects[0].box() == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        for o in objects:
            x, y, w, h = o.box()
            assert o.mask[y:y + h, x:x + w].sum() == o.mask.sum()  # nothing outside the box
            assert o.mask[y, x:x + w].any() and o.mask[y + h - 1, x:x + w].any()  # no empty border row / column
            assert o.mask[y:y + h, x].any() and o.mask[y:y + h, x + w - 1].any()


def test_json_boxes_are_those_of_the_rendered_scene(toy):
    val = json.loads((toy / "annotations" / "instances_val2017_basetarget.json").read_text())
    names = {c["id"]: c["name"] for c in val["categories"]}
    for index, image in enumerate(val["images"]):
        _, objects = world.render_scene(image_rng(0, "val", index), height=image["height"], width=image["width"])
        anns = [a for a in val["annotations"] if a["image_id"] == image["id"]]
        assert [(names[a["category_id"]], a["bbox"]) for a in anns] == [(o.name, o.box()) for o in objects]


def test_archive_round_trips_through_both_loaders(tmp_path):
    import open_clip

    torch.manual_seed(0)
    model = ToyCLIP(TINY_CLIP).eval()
    path = tmp_path / "clip_tiny_toy.pt"
    export_archive(model, path)
    arch, state = read_clip_archive(str(path))
    assert (arch.vision_layers, arch.vision_width, arch.output_dim, arch.attnpool_grid) == ((1, 1, 1, 1), 8, 32, 2)
    assert (arch.text_width, arch.text_layers, arch.context_length, arch.vocab_size) == (64, 1, 77, 49408)
    # OpenAI's layout: key order of its archives, int buffers, fp16 weights, fp32 norms and positions
    assert list(state)[:7] == ["positional_embedding", "text_projection", "logit_scale", "input_resolution",
                               "context_length", "vocab_size", "visual.conv1.weight"]
    assert int(state["input_resolution"]) == 64 and int(state["context_length"]) == 77
    assert state["visual.conv1.weight"].dtype == torch.float16 and state["visual.bn1.weight"].dtype == torch.float32
    assert state["positional_embedding"].dtype == torch.float32 and state["text_projection"].dtype == torch.float16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(path), map_location="cpu").state_dict()
        reference = open_clip.load_openai_model(str(path), device="cpu").state_dict()
    assert list(scripted) == list(state)
    assert all(torch.equal(scripted[k], state[k]) and scripted[k].dtype == state[k].dtype for k in state)
    assert set(reference) == set(state) - {"input_resolution", "context_length", "vocab_size"}
    assert all(torch.equal(reference[k].float(), state[k].float()) for k in reference)
    assert torch.equal(state["visual.layer4.0.conv2.weight"], model.visual.layer4[0].conv2.weight.half())

    # the detector's modules built from the archive compute what ToyCLIP computes with those weights
    rounded = ToyCLIP(TINY_CLIP).eval()
    load_state_into(rounded, {k: v.float() for k, v in state.items()})
    visual = build_visual(arch).eval()
    visual.load_state_dict({k: v.float() for k, v in visual_state_dict(state).items()})
    classifier = build_text_classifier(arch, 25, state).float()
    images = torch.randn(3, 3, 64, 64)
    tokens = classifier.tokenize(["a red star", "a photo of a crescent.", "hourglass"])
    with torch.no_grad():
        torch.testing.assert_close(visual(images), rounded.encode_image(images), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(classifier.encode_text(tokens), rounded.encode_text(tokens), rtol=1e-4, atol=1e-5)


def four_class_crops(seed: int, count: int) -> tuple[torch.Tensor, list[str], list[list[dict]]]:
    """`count` 64 px single-object crops cycling through the first 4 classes: uint8 images `[N, 3, 64, 64]`,
    captions ('a star') and per crop its region ({box, 'a red star'})."""
    rng = np.random.default_rng(seed)
    crops, captions, regions = [], [], []
    for i in range(count):
        image, objects = world.render_crop(rng, resolution=64, name=world.CLASS_NAMES[i % 4], scene_probability=0)
        crops.append(image)
        captions.append(f"a {objects[0].name}")
        regions.append([{"box": objects[0].box(), "caption": f"a {objects[0].colour} {objects[0].name}"}])
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous(), captions, regions


@pytest.mark.slow
@pytest.mark.parametrize("region_pairs", [False, True])
def test_short_clip_training_lowers_the_contrastive_loss(region_pairs):
    images, captions, regions = four_class_crops(0, 48)
    model, curve = train(images=images, captions=captions, cfg=TINY_CLIP, steps=40, batch_size=32, lr=2e-3,
                         warmup=5, log_every=10, regions=regions if region_pairs else None)
    assert curve[-1]["loss"] < 0.8 * curve[0]["loss"], curve
    with torch.no_grad():
        image, text = model(normalise(images[:8]), model_tokens(captions[:8]))
    ids = torch.tensor([i % 4 for i in range(8)])
    assert torch.isfinite(contrastive_loss(image, text, ids, model.logit_scale))
    assert F.cosine_similarity(image, text).shape == (8,)


def test_clip_training_is_reproducible_from_its_seed():
    """Same seed, same weights (bfloat16 autocast included): the bundled CLIP is reproducible by run_all.sh."""
    images, captions, regions = four_class_crops(1, 16)
    runs = [train(images=images, captions=captions, cfg=TINY_CLIP, steps=3, batch_size=8, warmup=1, seed=seed,
                  regions=regions)[0].state_dict() for seed in (5, 5, 6)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_clip_training_options_are_checked_before_it_starts():
    images, captions, regions = four_class_crops(2, 2)
    for bad, message in (({"precision": "fp16"}, "precision='fp16'"), ({"prematch_weight": -1.0}, "prematch_weight=-1"),
                         ({"positives": "labels"}, "positives='labels'")):
        with pytest.raises(ValueError, match=message):
            train(images=images, captions=captions, cfg=TINY_CLIP, steps=1, batch_size=2, regions=regions, **bad)


def test_captions_naming_the_same_shapes_are_positives():
    from tools.toy.train_clip import caption_key

    assert caption_key("a photo of a red star and a blue heart.") == "star heart"
    assert caption_key("a heart and a star") == "heart star"  # order is part of what a caption says
    assert caption_key("a cropped photo of the purple pentagon.") == caption_key("pentagon") == "pentagon"
    assert caption_key("a house") == "house" and caption_key("a ringed hourglass") == "hourglass"
    assert caption_key("a red star", "captions") == "a red star"
    with pytest.raises(ValueError, match="positives='labels'"):
        caption_key("a star", "labels")
    # the loss's targets: each row spreads its mass over the captions with its key
    logits_scale = torch.tensor(0.0)
    image = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), dim=-1)
    ids = torch.tensor([0, 1, 0])
    expected = 0.0
    for row in (image @ image.t(), (image @ image.t()).t()):
        log_p = F.log_softmax(row, dim=1)
        expected += -0.5 * torch.stack([log_p[0, [0, 2]].mean(), log_p[1, 1], log_p[2, [0, 2]].mean()]).mean()
    torch.testing.assert_close(contrastive_loss(image, image, ids, logits_scale), expected)


def model_tokens(captions: list[str]) -> torch.Tensor:
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()(captions, context_length=32)


def _toy_config_argv(tmp_path: Path, **env: str) -> argparse.Namespace:
    """main.py's arguments as `configs/toy/toy_*.sh` launches them (a stand-in torchrun records its argv)."""
    import os
    import shutil
    import subprocess

    from main import get_args_parser

    root = Path(__file__).resolve().parents[1]
    work = tmp_path / "repo"
    if not work.exists():
        shutil.copytree(root / "configs", work / "configs")
        (work / "bin").mkdir()
        (work / "bin" / "torchrun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGV_OUT"\n')
        (work / "bin" / "torchrun").chmod(0o755)
    out = tmp_path / "argv.txt"
    environ = {**os.environ, "PATH": f"{work / 'bin'}:{os.environ['PATH']}", "ARGV_OUT": str(out), **env}
    subprocess.run(["bash", "configs/toy/toy_dab_ovd_apm_splcls0.2_relabel.sh", "toy", "1", "local"], cwd=work,
                   env=environ, check=True, capture_output=True)
    argv = out.read_text().splitlines()
    assert argv[:2] == ["--standalone", "--nproc_per_node=1"] and argv[2] == "main.py"
    return get_args_parser().parse_args(argv[3:])


def test_toy_config_and_its_ablation_switches(tmp_path):
    args = _toy_config_argv(tmp_path)
    assert (args.anchor_pre_matching, args.condition_on_text, args.remove_misclassified) == (True, True, True)
    assert args.split_class_p == 0.2 and args.label_version == "RN50base" and args.backbone == "clip_toy"
    assert args.coco_path == "data/toy" and args.output_dir == "logs/toy/toy_dab_ovd_apm_splcls0.2_relabel/toy"
    agnostic = _toy_config_argv(tmp_path, apm="0")
    assert (agnostic.anchor_pre_matching, agnostic.condition_on_text, agnostic.remove_misclassified) == (False,) * 3
    assert agnostic.split_class_p == 0.0 and agnostic.label_version == "RN50base"
    annotated = _toy_config_argv(tmp_path, label_version="", data_path="/elsewhere")
    assert annotated.label_version == "" and annotated.anchor_pre_matching and annotated.coco_path == "/elsewhere"
    changed = {k for k in vars(args) if getattr(args, k) != getattr(annotated, k)}
    assert changed == {"label_version", "coco_path", "model_path"}


def test_report_reads_finished_runs_and_builds_the_ablation_table(tmp_path):
    from tools.toy import report

    def stats(novel, base, ap50_all):
        values = [0.0] * 16
        values[1], values[12], values[13] = ap50_all, base, novel
        return values

    localizer = tmp_path / "localizer"
    for exp, epochs, logged in (("toy", 2, 2), ("noapm", 3, 2)):
        folder = localizer / exp
        folder.mkdir(parents=True)
        (folder / "run_20260101_000000.json").write_text(json.dumps({"args": {"epochs": epochs}}))
        lines = [{"epoch": e, "test_coco_eval_bbox": stats(10.0 * (e + 1), 20.0 * (e + 1), 0.3 * (e + 1))}
                 for e in range(logged)]
        (folder / "log.txt").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert report.finished(localizer / "toy") and not report.finished(localizer / "noapm")
    assert not report.finished(localizer / "annotated")
    assert report.ap50(localizer / "toy") == {"novel": 20.0, "base": 40.0, "all": pytest.approx(60.0), "epoch": 1}
    accuracy = tmp_path / "region_accuracy.json"
    accuracy.write_text(json.dumps({"results": {"CLIP (no prompt)": {"base": 0.5, "novel": 0.25, "all": 0.4},
                                                "region prompt": {"base": 0.75, "novel": None, "all": 0.6}}}))
    times = tmp_path / "times.json"
    report.record("clip", 700, times)
    report.record("localizer", 80, times)
    table = report.ablation_table(localizer=localizer, region_accuracy=accuracy, times=times).splitlines()
    assert "| CLIP | 50.0 | 25.0 | 40.0 |" in table and "| CLIP + region prompt | 75.0 | - | 60.0 |" in table
    assert f"| {report.VARIANTS[0][1]} | 20.0 | 40.0 | 60.0 |" in table
    assert f"| {report.VARIANTS[2][1]} | - | - | - |" in table
    assert table[-1].endswith("clip 700, localizer 80")


def test_region_pairs_are_embedded_through_the_detectors_region_paths():
    """train_clip's region views (boxes in crop pixels) = models.region_head and anchor pre-matching's pooling
    on the same weights (boxes as the detector gives them: cxcywh normalised to the image); and boxes follow
    the flips and quarter turns."""
    from tools.region_prompt import build_region_classifier
    from tools.toy.train_clip import augment, embed_views
    from util.nested_tensor import NestedTensor

    torch.manual_seed(0)
    model = ToyCLIP(TINY_CLIP).eval()
    images = torch.randn(3, 3, 64, 64)
    boxes = torch.tensor([[3.0, 5.0, 40.0, 33.0], [10.5, 0.0, 64.0, 64.0], [20.0, 22.0, 31.0, 30.0]])
    with torch.no_grad():
        image_emb, region_emb, prematch_emb = embed_views(model, images, boxes)
        torch.testing.assert_close(image_emb, model.encode_image(images), rtol=1e-5, atol=1e-6)
        state = {f"visual.{k}": v for k, v in model.visual.state_dict().items()}
        classifier = build_region_classifier(read_clip_arch(model), state).eval()
        cxcywh = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], dim=1) / 64
        samples = NestedTensor(images, torch.zeros(3, 64, 64, dtype=torch.bool))
        expected = classifier(samples, [b[None] for b in cxcywh])
        expected_prematch = classifier.prematch_embed(classifier.trunk(samples)["layer4"], [b[None] for b in cxcywh])
    torch.testing.assert_close(F.normalize(region_emb, dim=-1), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(prematch_emb, expected_prematch, rtol=1e-4, atol=1e-5)

    generator = torch.Generator().manual_seed(3)
    masks = torch.zeros(3, 1, 64, 64)
    integer = boxes.floor()
    for mask, (x0, y0, x1, y1) in zip(masks, integer.long().tolist()):
        mask[0, y0:y1, x0:x1] = 1
    for _ in range(8):
        moved, moved_boxes = augment(masks, generator, integer)
        for mask, box in zip(moved, moved_boxes):
            ys, xs = torch.nonzero(mask[0], as_tuple=True)
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def read_clip_arch(model: ToyCLIP):
    from models.clip import architecture_from_state_dict

    return architecture_from_state_dict(model.state_dict(), source="ToyCLIP")


def test_caption_records_carry_each_objects_box_and_caption(toy):
    records = json.loads((toy / "clip" / "captions_train.json").read_text())["images"]
    assert all(r["regions"] for r in records) and len(records) == SMALL["captions"]
    for index, record in enumerate(records):
        image, objects = world.render_crop(image_rng(0, "clip_train", index), resolution=SMALL["crop_resolution"])
        assert [region["box"] for region in record["regions"]] == [o.box() for o in objects]
        assert all(o.name in region["caption"] for o, region in zip(objects, record["regions"]))


def test_bundle_keeps_the_ema_detector_without_clip_and_refuses_incomplete_runs(toy, tmp_path):
    from tools.toy import bundle
    from util.checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    ema = {"query_embed.weight": torch.randn(5, 4), "backbone.0.body.conv1.weight": torch.randn(2, 3, 1, 1),
           "classifier.token_embedding.weight": torch.randn(3, 2), "objectness_embed.bias": torch.randn(1)}
    args = argparse.Namespace(image_scale=0.32, epochs=1)
    save_checkpoint({"model": {k: v + 1 for k, v in ema.items()}, "model_ema": ema, "args": args, "epoch": 0},
                    run / "checkpoint.pth")
    (run / "run_20260101_000000.json").write_text(json.dumps({"argv": ["main.py", "--epochs", "1"], "git_sha": "abc",
                                                              "args": {"epochs": 1}}))
    clip, prompt = tmp_path / "clip.pt", tmp_path / "prompt.pth"
    clip.write_bytes(b"archive")
    prompt.write_bytes(b"prompt")
    out = tmp_path / "assets"
    record = bundle.bundle(run_dir=run, clip=clip, prompt=prompt, data=toy, out=out, samples=2)

    saved = load_checkpoint(out / "cora_toy.pth")
    assert set(saved["model"]) == {"query_embed.weight", "objectness_embed.bias"}
    assert all(torch.equal(saved["model"][k], ema[k]) for k in saved["model"])  # the EMA weights, not `model`
    assert saved["args"] == args
    assert (out / "clip_toy.pt").read_bytes() == b"archive"
    assert (out / "region_prompt_toy.pth").read_bytes() == b"prompt"
    val = json.loads((toy / "annotations" / "instances_val2017_basetarget.json").read_text())
    split = {c["id"]: c["split"] for c in val["categories"]}
    mixed = sorted({a["image_id"] for a in val["annotations"] if split[a["category_id"]] == "novel"}
                   & {a["image_id"] for a in val["annotations"] if split[a["category_id"]] == "base"})[:2]
    names = {i["id"]: i["file_name"] for i in val["images"]}
    assert sorted(p.name for p in (out / "samples").iterdir()) == sorted(names[i] for i in mixed)
    assert record["run_argv"] == ["main.py", "--epochs", "1"] and record["run_git_sha"] == "abc"
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["files"]["clip_toy.pt"]["sha256"] == hashlib.sha256(b"archive").hexdigest()

    with pytest.raises(FileNotFoundError, match=r"checkpoint\.pth: localizer checkpoint not found"):
        bundle.bundle(run_dir=tmp_path / "nowhere", clip=clip, prompt=prompt, data=toy, out=out)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt: CLIP archive not found"):
        bundle.bundle(run_dir=run, clip=tmp_path / "missing.pt", prompt=prompt, data=toy, out=out)
    save_checkpoint({"model": ema, "model_ema": -1, "args": args}, run / "checkpoint.pth")
    with pytest.raises(ValueError, match="no model_ema weights"):
        bundle.bundle(run_dir=run, clip=clip, prompt=prompt, data=toy, out=out)


def test_region_lists_must_match_the_images():
    images = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="regions: 1 lists for 2 images"):
        train(images=images, captions=["a star", "a ring"], cfg=TINY_CLIP, steps=1, regions=[[]])


# --------------------------------------------------------------------------- CORA+ and LVIS in miniature
def _annotations(objects: dict[int, list[tuple[int, float]]]) -> dict:
    """A toy-world-style json: per image id, (category id, box side) objects."""
    categories = [{"id": c.id, "name": c.name, "split": c.split} for c in world.CLASSES]
    images, annotations = [], []
    for image_id, objs in objects.items():
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": 256, "height": 256})
        for cat, side in objs:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "bbox": [10, 10, side, side], "area": side * side, "iscrowd": 0})
    return {"images": images, "annotations": annotations, "categories": categories}


def test_scene_captions_name_what_the_scene_holds():
    from tools.toy.scene_captions import CAPTIONS_PER_IMAGE, scene_captions

    data = _annotations({1: [(5, 40), (2, 90), (7, 20)], 2: [(14, 30)], 3: []})
    out = scene_captions(data, seed=0)
    assert out == scene_captions(data, seed=0) and out != scene_captions(data, seed=3)  # a function of the seed
    by_image = {}
    for c in out["annotations"]:
        by_image.setdefault(c["image_id"], []).append(c["caption"])
    names = {c.id: c.name for c in world.CLASSES}
    assert set(by_image) == {1, 2} and all(len(v) <= CAPTIONS_PER_IMAGE for v in by_image.values())
    assert "square" in by_image[1][0]  # the largest object is always named first
    mentioned = {w for caption in by_image[1] for w in caption.replace(",", " ").replace(".", " ").split()}
    assert mentioned & set(world.CLASS_NAMES) <= {names[5], names[2], names[7]}  # nothing that is not there
    assert "lightning" in by_image[2][0]


def test_lvis_export_frequencies_and_negatives(toy, tmp_path):
    from datasets.lvis import LvisDetection
    from datasets.ovd_eval import LvisEvaluator
    from tools.toy.to_lvis import frequencies, to_lvis

    # hand-made counts: class 1 in 3 images, 2 in 2, 3 in 1, 4 (and the rest) in none
    train = _annotations({1: [(1, 20), (2, 20)], 2: [(1, 20), (2, 20)], 3: [(1, 20), (3, 20)]})
    freq = frequencies(train, train)
    assert freq[1] == "f" and freq[2] == "f" and freq[3] == "c" and freq[4] == "r"  # median split of 1, 2, 3
    out = to_lvis(toy, tmp_path / "lvis")
    val_ids = {c["id"] for c in out["val"]["categories"]}
    rare = {c["id"] for c in out["val"]["categories"] if c["frequency"] == "r"}
    base_json = json.loads((toy / "annotations" / "instances_train2017_base.json").read_text())
    boxed = {a["category_id"] for a in base_json["annotations"]}
    # rare = never boxed in training: the novel classes, and in this 6-scene world some base ones too
    assert rare == val_ids - boxed and rare >= {c.id for c in world.CLASSES if c.split == "novel"}
    assert len(val_ids) == 16
    assert {c["id"] for c in out["train"]["categories"]} == val_ids - rare
    assert not {a["category_id"] for a in out["train"]["annotations"]} & rare
    for img in out["val"]["images"]:
        present = {a["category_id"] for a in out["val"]["annotations"] if a["image_id"] == img["id"]}
        assert set(img["neg_category_ids"]) == val_ids - present and img["not_exhaustive_category_ids"] == []
    dataset = LvisDetection(img_folder=tmp_path / "lvis", ann_file=tmp_path / "lvis" / "lvis_v1_val.json",
                            label_map=True)
    assert [dataset.label2catid[i] for i in dataset.novel_indices] == sorted(rare)
    LvisEvaluator(str(tmp_path / "lvis" / "lvis_v1_val.json"), dataset.label2catid, verbose=False)


def test_pseudo_box_quality_by_hand():
    from tools.toy.report import pseudo_box_quality

    truth = _annotations({1: [(5, 40), (2, 40)], 2: [(5, 40)]})  # two heart boxes (novel), one square (base)
    truth["annotations"][1]["bbox"] = [100, 100, 40, 40]
    boxes = [
        {"image_id": 1, "bbox": [10, 10, 40, 40], "class_label": "heart", "score": 0.9},  # right
        {"image_id": 1, "bbox": [12, 12, 40, 40], "class_label": "heart", "score": 0.8},  # the same heart again
        {"image_id": 1, "bbox": [100, 100, 40, 40], "class_label": "heart", "score": 0.7},  # a square called heart
        {"image_id": 1, "bbox": [100, 100, 40, 40], "class_label": "square", "score": 0.6},  # right
    ]
    q = pseudo_box_quality(boxes, truth)
    assert q["novel"] == {"pseudo_boxes": 3, "correct": 1, "true_boxes": 2, "precision": 100 / 3, "recall": 50.0}
    assert q["base"] == {"pseudo_boxes": 1, "correct": 1, "true_boxes": 1, "precision": 100.0, "recall": 100.0}
