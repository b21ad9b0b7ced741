"""CLIP-aligned labelling (tools/relabel.py) and the three-stage pipeline (tools/reproduce_coco.sh)."""
import copy
import json
import os
import subprocess
import time

import pytest
import torch

import tools.relabel as rl
from datasets.transforms import make_coco_transforms
from models.clip import load_region_prompt, read_clip_archive
from tests import golden
from tests.conftest import HANG_GUARD_S
from tests.tiny_coco import TRAIN_JSON, TRAIN_RELABEL_JSON, VAL_JSON, make_tiny_coco
from tools.region_prompt import ShardSampler, build_region_classifier
from util.checkpoint import load_checkpoint
from util.nested_tensor import NestedTensor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small_coco(root, train_ids, val_ids):
    """The tiny COCO-OVD data cut to a few images (fast), without the relabelled json."""
    info = make_tiny_coco(root)
    for key, ids in (("train_base", train_ids), ("val_basetarget", val_ids)):
        split = "train" if key == "train_base" else "val"
        data = info["gt"][split]
        data = dict(data, images=[i for i in data["images"] if i["id"] in ids],
                    annotations=[a for a in data["annotations"] if a["image_id"] in ids])
        info["gt"][split] = data
        info["ann_files"][key].write_text(json.dumps(data))
    info["ann_files"].pop("train_RN50relabel").unlink()
    return info


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    # train 139 has a crowd box (never relabelled), 724 has no annotation
    return _small_coco(tmp_path_factory.mktemp("coco"), train_ids={785, 139, 724}, val_ids={397133, 37777})


def _box_embeddings(info):
    """Each annotated box's region embedding, image by image (batch of one, val transform), with the
    tiny CLIP and the golden region prompt: `[(annotation id, embedding [D])]`."""
    arch, sd = read_clip_archive(golden.path("clip_tiny.pt"))
    prompt = load_region_prompt(golden.path("region_prompt_tiny.pth"), arch)
    model = build_region_classifier(arch, sd, region_prompt=prompt).eval()
    dataset = rl.AnnotatedCocoBoxes(img_folder=info["image_dirs"]["train"], ann_file=info["ann_files"]["train_base"],
                                transforms=make_coco_transforms("val", clip_normalisation=True))
    out = []
    for index in range(len(dataset)):
        image, target = dataset[index]
        if len(target["boxes"]) == 0:
            continue
        with torch.no_grad():
            emb = model(NestedTensor(image[None], torch.zeros(1, *image.shape[1:], dtype=torch.bool)),
                        [target["boxes"]])
        out += list(zip(target["ann_ids"].tolist(), emb))
    return out, dataset


def test_relabel_gives_the_classes_the_classifier_is_built_to_give(coco, tmp_path, monkeypatch, capsys):
    """Text embeddings made from the boxes' own region embeddings: each box's best class is known."""
    boxes, dataset = _box_embeddings(coco)
    gt = coco["gt"]["train"]
    non_crowd = [a["id"] for a in gt["annotations"] if not a["iscrowd"]]
    assert sorted(ann_id for ann_id, _ in boxes) == sorted(non_crowd)

    # the first box keeps its annotated class (so "unchanged" is not trivially zero), the others get
    # distinct random classes
    first_id = boxes[0][0]
    annotated_label = dataset.catid2label[next(a["category_id"] for a in gt["annotations"] if a["id"] == first_id)]
    generator = torch.Generator().manual_seed(0)
    others = [c for c in torch.randperm(len(dataset.category_list), generator=generator).tolist()
              if c != annotated_label]
    classes = [annotated_label] + others[: len(boxes) - 1]
    text = torch.nn.functional.normalize(torch.randn(len(dataset.category_list), boxes[0][1].numel(),
                                                     generator=generator), dim=-1)
    for (_, emb), label in zip(boxes, classes):
        text[label] = emb
    similarity = torch.stack([emb for _, emb in boxes]) @ text.t()
    runner_up = similarity.clone()
    runner_up[range(len(boxes)), classes] = -2
    assert (similarity[range(len(boxes)), classes] - runner_up.max(dim=1).values).min() > 1e-3  # a clear argmax

    def text_for(classifier, names):
        assert list(names) == dataset.category_list  # the training json's vocabulary
        return text

    monkeypatch.setattr(rl, "text_embeddings", text_for)
    target = tmp_path / "relabelled.json"
    argv = ["--coco_path", str(coco["root"]), "--model_path", golden.path("clip_tiny.pt"),
            "--region_prompt_path", golden.path("region_prompt_tiny.pth"), "--batch_size", "1",
            "--num_workers", "0", "--device", "cpu", "--relabel_folder", str(tmp_path / "export"),
            "--target_name", str(target)]
    result = rl.main(rl.get_args_parser().parse_args(argv))

    expected = {str(ann_id): dataset.label2catid[label] for (ann_id, _), label in zip(boxes, classes)}
    assert json.loads((tmp_path / "export" / "export_label_0.json").read_text()) == expected
    assert result["mapping"] == expected

    relabelled = json.loads(target.read_text())
    want = copy.deepcopy(gt)
    for ann in want["annotations"]:
        ann["category_id"] = expected.get(str(ann["id"]), ann["category_id"])
    assert relabelled == want  # crowd boxes and everything else unchanged, key order kept
    assert [a["category_id"] for a in relabelled["annotations"] if a["iscrowd"]] == \
        [a["category_id"] for a in gt["annotations"] if a["iscrowd"]]
    unchanged = sum(a["category_id"] == expected[str(a["id"])] for a in gt["annotations"] if str(a["id"]) in expected)
    assert unchanged >= 1
    out = capsys.readouterr().out
    assert f"label accuracy: {unchanged / len(expected)}\n" in out
    assert f"{len(expected)} relabeled instances in total\n" in out
    assert result["merge"] == {"accuracy": unchanged / len(expected), "total": len(expected), "unchanged": unchanged}


def _merge(tmp_path, folder, num_files, name, source):
    argv = ["--merge_only", "--ori_annotation", str(source), "--relabel_folder", str(folder), "--num_files",
            str(num_files), "--target_name", str(tmp_path / name)]
    return rl.main(rl.get_args_parser().parse_args(argv))


def test_merging_partial_files_equals_one_file(tmp_path, capsys):
    anno = {"info": {"x": 1}, "images": [{"id": 1}], "categories": [{"id": 3, "name": "a"}, {"id": 5, "name": "b"}],
            "annotations": [{"id": i, "image_id": 1, "category_id": 3 if i % 2 else 5, "bbox": [0, 0, 1, 1]}
                            for i in range(1, 11)]}
    source = tmp_path / "ori.json"
    source.write_text(json.dumps(anno))
    parts = [{"1": 3, "2": 3, "3": 5}, {"4": 5, "5": 5, "6": 3}, {"7": 3, "8": 3, "99": 5}]
    whole = tmp_path / "whole"
    split = tmp_path / "split"
    whole.mkdir()
    split.mkdir()
    merged = {}
    for i, part in enumerate(parts):
        (split / f"export_label_{i}.json").write_text(json.dumps(part))
        merged.update(part)
    (whole / "export_label_0.json").write_text(json.dumps(merged))

    one = _merge(tmp_path, whole, 1, "one.json", source)["merge"]
    out_one = capsys.readouterr().out
    three = _merge(tmp_path, split, 3, "three.json", source)["merge"]
    out_three = capsys.readouterr().out
    assert (tmp_path / "one.json").read_bytes() == (tmp_path / "three.json").read_bytes()
    assert one == three and out_one == out_three

    # by hand: 9 ids (99 is not in the json but counts, as in the original); ids 1, 4, 7 keep their class
    assert one == {"accuracy": 3 / 9, "total": 9, "unchanged": 3}
    assert out_one.splitlines() == [f"label accuracy: {3 / 9}", "9 relabeled instances in total"]
    result = json.loads((tmp_path / "one.json").read_text())
    assert [a["category_id"] for a in result["annotations"]] == [3, 3, 5, 5, 5, 3, 3, 3, 3, 5]
    assert {k: v for k, v in result.items() if k != "annotations"} == {k: v for k, v in anno.items()
                                                                       if k != "annotations"}

    # a later file wins for an id listed twice (dict.update)
    (split / "export_label_3.json").write_text(json.dumps({"1": 5}))
    assert _merge(tmp_path, split, 4, "four.json", source)["merge"]["unchanged"] == 2
    with pytest.raises(FileNotFoundError, match="export_label_4.json not found"):
        _merge(tmp_path, split, 5, "five.json", source)


def test_shards_cover_every_image_once():
    shards = [list(ShardSampler(range(11), rank=r, world_size=3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11)) and shards[1] == [1, 4, 7, 10]


def _pipeline(workdir, env):
    start = time.time()
    out = subprocess.run(["bash", "tools/reproduce_coco.sh", "R50", "1", "tiny"], cwd=workdir, env=env,
                         capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out.stdout, time.time() - start


@pytest.mark.slow
def test_pipeline_runs_three_stages_then_skips_them(tmp_path):
    # one training image (two boxes) keeps the three stages at one iteration each
    info = _small_coco(tmp_path / "coco", train_ids={785}, val_ids={397133})
    # the pipeline works in the current folder (configs/, tools/, logs/), like the original's configs
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("configs", "tools", "main.py", "scripts"):
        os.symlink(os.path.join(ROOT, name), work / name)
    # tiny flags; the accuracy report and the localizer's evaluation are tested elsewhere, skipped here
    tiny = "--num_workers 0 --device cpu --batch_size 1 --epochs 1"
    env = dict(os.environ, PYTHONPATH=ROOT, data_path=str(info["root"]), CLIP_PATH=golden.path("clip_tiny.pt"),
               OMP_NUM_THREADS="2", PROMPT_ARGS=f"{tiny} --no_eval", RELABEL_ARGS="--num_workers 0 --device cpu",
               LOCALIZER_ARGS=f"{tiny} --text_len 15 --dim_feedforward 64 --num_queries 30 --enc_layers 1 "
                              "--dec_layers 2 --text_dim 64 --model_ema_decay 0.9 --eval_every_epoch 2")
    stdout, _ = _pipeline(work, env)
    assert "skipped" not in stdout

    prompt = work / "logs" / "region_prompt_R50.pth"
    arch, _ = read_clip_archive(golden.path("clip_tiny.pt"))
    assert load_region_prompt(str(prompt), arch)["attnpool.positional_embedding"].shape == (50, 256)
    assert load_checkpoint(work / "logs" / "COCO" / "region_prompt_R50" / "tiny" / "checkpoint.pth")["epoch"] == 0
    assert json.loads((work / "logs" / "relabel_RN50" / "export_label_0.json").read_text())
    relabelled = json.loads((info["root"] / "annotations" / TRAIN_RELABEL_JSON).read_text())
    base = info["gt"]["train"]
    assert [a["id"] for a in relabelled["annotations"]] == [a["id"] for a in base["annotations"]]
    assert relabelled["images"] == base["images"] and relabelled["categories"] == base["categories"]
    run = work / "logs" / "COCO" / "R50_dab_ovd_3enc_apm128_splcls0.2_relabel_noinit" / "tiny"
    checkpoint = load_checkpoint(run / "checkpoint.pth")
    assert checkpoint["epoch"] == 0 and checkpoint["args"].label_version == "RN50base"
    assert checkpoint["args"].region_prompt_path == "logs/region_prompt_R50.pth"

    stamps = {p: p.stat().st_mtime_ns for p in (prompt, info["root"] / "annotations" / TRAIN_RELABEL_JSON,
                                                run / "checkpoint.pth")}
    stdout, _ = _pipeline(work, env)
    assert stdout.count("exists, skipped") == 2 and "finished, skipped" in stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (info["root"] / "annotations" / TRAIN_JSON).is_file() and (info["root"] / "annotations" / VAL_JSON).is_file()
