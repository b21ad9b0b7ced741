"""CORA+: tags from captions, pseudo boxes from a checkpoint (tools/pseudo_label.py), and training with them
(`--pseudo_box`: the dataset's IoU filter, the engine's category list)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datasets import build_dataset
from datasets.pseudo_boxes import PSEUDO_LABEL, load_pseudo_boxes
from engine import with_pseudo_categories
from tests import golden
from tests.conftest import ROOT, launch_environ
from tests.helpers import main_argv, parsed_args, run_main
from tests.tiny_coco import make_tiny_coco
from tools import caption_tags, pseudo_label
from util.box_ops import box_cxcywh_to_xyxy, box_iou


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_tiny_coco(tmp_path_factory.mktemp("coco"))


# --------------------------------------------------------------------------- tags from captions
def test_caption_tags_by_hand():
    categories = [{"id": 1, "name": "cat"}, {"id": 2, "name": "bus"}, {"id": 3, "name": "strawberry"},
                  {"id": 4, "name": "speaker_(stereo_equipment)", "synonyms": ["speaker_(stereo_equipment)",
                                                                             "loudspeaker"]},
                  {"id": 5, "name": "tv"}, {"id": 6, "name": "hot dog"}]
    captions = [
        {"image_id": 1, "caption": "Two CATS sleeping on a category sign."},  # plural, any case; not 'category'
        {"image_id": 2, "caption": "Buses and a bus stop"},
        {"image_id": 2, "caption": "a man eating strawberries next to a loudspeaker"},  # two captions, one image
        {"image_id": 3, "caption": "A television showing a hot-dog stand and a speaker."},
        {"image_id": 4, "caption": "a dog on a catwalk"},  # no class: 'catwalk' is not 'cat'
    ]
    tags = caption_tags.caption_tags(captions, categories, {"tv": ["television"]})
    assert tags == {"1": ["cat"], "2": ["bus", "speaker (stereo equipment)", "strawberry"],
                    "3": ["hot dog", "speaker (stereo equipment)", "tv"]}
    with pytest.raises(ValueError, match=r"--synonyms: \['tvs'\] are not category names"):
        caption_tags.caption_tags(captions, categories, {"tvs": ["television"]})


def test_caption_tags_command_line(tmp_path, capsys):
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"annotations": [{"image_id": 7, "caption": "a red heart and two stars"},
                                                    {"image_id": 8, "caption": "nothing here"}]}))
    cats = tmp_path / "cats.json"
    cats.write_text(json.dumps({"categories": [{"id": 1, "name": "heart"}, {"id": 2, "name": "star"}]}))
    out = tmp_path / "tags.json"
    caption_tags.main(["--captions", str(captions), "--categories", str(cats), "--out", str(out)])
    assert json.loads(out.read_text()) == {"7": ["heart", "star"]}
    assert "1 of 2 captioned images tagged (1 name no class)" in capsys.readouterr().out
    with pytest.raises(ValueError, match="expected a json object with an 'annotations' list"):
        cats_only = tmp_path / "list.json"
        cats_only.write_text("[]")
        caption_tags.main(["--captions", str(cats_only), "--categories", str(cats), "--out", str(out)])


# --------------------------------------------------------------------------- training with pseudo boxes
def _pseudo_file(path: Path, entries: list) -> Path:
    path.write_text(json.dumps(entries))
    return path


def test_pseudo_box_file_is_checked_before_training(coco, tmp_path):
    ids = [785, 139]
    good = {"image_id": 785, "bbox": [1, 2, 10, 12], "class_label": "zebra", "score": 0.5}
    cases = [
        ([dict(good, image_id=999)], r"1 of 1 boxes name image ids that the training json does not list"),
        ([dict(good, bbox=[1, 2, math.nan, 3])], r"entry #0 \(image 785\): 'bbox' has non-finite values"),
        ([dict(good, bbox=[1, 2, 0, 3])], r"entry #0 \(image 785\): 'bbox' \[1, 2, 0, 3\] has no area"),
        ([dict(good, class_label=" ")], r"entry #0 \(image 785\): 'class_label' must be a class name"),
        ([{"image_id": 785, "bbox": [1, 2, 3, 4]}], r"entry #0 needs 'image_id', 'bbox' and 'class_label'"),
        ({"785": []}, r"expected a JSON list"),
    ]
    for entries, message in cases:
        with pytest.raises(ValueError, match=message):
            load_pseudo_boxes(_pseudo_file(tmp_path / "p.json", entries), ids)
    with pytest.raises(FileNotFoundError, match="--pseudo_box .*nowhere.json: file not found"):
        load_pseudo_boxes(tmp_path / "nowhere.json", ids)
    assert load_pseudo_boxes(_pseudo_file(tmp_path / "p.json", [good]), ids) == {
        785: [{"bbox": [1.0, 2.0, 10.0, 12.0], "class_label": "zebra", "score": 0.5}]}
    # through main.py: the run stops at start, naming the file
    import main as cora_main

    bad = _pseudo_file(tmp_path / "bad.json", [dict(good, image_id=12345)])
    with pytest.raises(ValueError, match="--pseudo_box .*bad.json: 1 of 1 boxes"):
        cora_main.main(parsed_args(*main_argv(coco["root"], tmp_path / "run", "--pseudo_box", str(bad))))
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


def test_dataset_appends_pseudo_boxes_and_drops_those_on_ground_truth(coco, tmp_path):
    """SPEC §2.3: pseudo boxes after the ground truth, through the transforms, kept only with IoU < 0.5 to
    every ground-truth box; computed here on the val transform (no randomness) for boxes placed by hand."""
    gt = coco["gt"]["train"]
    image_id = 785
    x, y, w, h = next(a["bbox"] for a in gt["annotations"] if a["image_id"] == image_id and not a["iscrowd"])
    far = [0, 0, 4, 4] if x > 10 or y > 10 else [x + w + 2, y + h + 2, 4, 4]
    entries = [  # IoU with the ground-truth box: 1, 0.75, 1/3, 0 (before clamping to the image)
        {"image_id": image_id, "bbox": [x, y, w, h], "class_label": "same"},
        {"image_id": image_id, "bbox": [x, y, 0.75 * w, h], "class_label": "mostly"},
        {"image_id": image_id, "bbox": [x + w / 3 + 0.25 * w, y, 2 / 3 * w, h], "class_label": "half"},
        {"image_id": image_id, "bbox": far, "class_label": "apart"},
    ]
    path = _pseudo_file(tmp_path / "pseudo.json", entries)
    args = parsed_args("--coco_path", str(coco["root"]), "--ovd", "--pseudo_box", str(path))
    dataset = build_dataset("train", args)
    dataset._transforms = build_dataset("val", args)._transforms  # deterministic geometry
    _, target = dataset[dataset.ids.index(image_id)]
    is_pseudo = target["labels"] == PSEUDO_LABEL
    boxes = box_cxcywh_to_xyxy(target["boxes"])
    overlap = box_iou(boxes[is_pseudo], boxes[~is_pseudo])[0].max(dim=1).values
    expected = [e["class_label"] for e in entries
                if _iou(e["bbox"], [x, y, w, h]) < 0.5]
    assert target["pseudo_labels"] == expected == ["half", "apart"]
    assert (overlap < 0.5).all() and is_pseudo[-2:].all() and not is_pseudo[:-2].any()
    other = dataset[dataset.ids.index(139)][1]  # an image without pseudo boxes
    assert other["pseudo_labels"] == [] and not (other["labels"] == PSEUDO_LABEL).any()


def _iou(a, b):
    ax0, ay0, ax1, ay1 = a[0], a[1], a[0] + a[2], a[1] + a[3]
    bx0, by0, bx1, by1 = b[0], b[1], b[0] + b[2], b[1] + b[3]
    inter = max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def test_engine_appends_the_batch_pseudo_names_to_the_categories():
    targets = [{"labels": torch.tensor([1, PSEUDO_LABEL, PSEUDO_LABEL]), "pseudo_labels": ["zebra", "cat"]},
               {"labels": torch.tensor([PSEUDO_LABEL, 0]), "pseudo_labels": ["cat"]},
               {"labels": torch.tensor([0])}]
    categories, relabelled = with_pseudo_categories(["person", "car"], targets)
    assert categories == ["person", "car", "cat", "zebra"]
    assert [t["labels"].tolist() for t in relabelled] == [[1, 3, 2], [2, 0], [0]]
    assert targets[0]["labels"].tolist() == [1, PSEUDO_LABEL, PSEUDO_LABEL]  # the inputs are left alone
    assert with_pseudo_categories(["a"], [{"labels": torch.tensor([0])}])[0] == ["a"]
    with pytest.raises(ValueError, match="2 pseudo boxes but 1 pseudo_labels"):
        with_pseudo_categories(["a"], [{"labels": torch.tensor([PSEUDO_LABEL, PSEUDO_LABEL]), "pseudo_labels": ["x"],
                                        "image_id": 5}])


# --------------------------------------------------------------------------- tools/pseudo_label.py
def _tags(coco, tmp_path, extra: dict | None = None) -> Path:
    images = sorted(i["id"] for i in coco["gt"]["train"]["images"])
    tags = {str(images[0]): ["cat", "red square"], str(images[1]): ["dog"], str(images[2]): [],
            **(extra or {})}
    path = tmp_path / "tags.json"
    path.write_text(json.dumps(tags))
    return path


def _label_args(coco, tmp_path, tags: Path, *extra: str):
    return pseudo_label.get_args_parser().parse_args([
        "--resume", golden.path("checkpoint_tiny.pth"), "--coco_path", str(coco["root"]), "--cls_annotation_path",
        str(tags), "--det_thr", "0.001", "--output", str(tmp_path / "pseudo.json"), "--device", "cpu", *extra])


@pytest.mark.slow
def test_pseudo_label_detects_each_image_with_its_tags(coco, tmp_path, capsys):
    from models.predictor import Predictor

    tags = _tags(coco, tmp_path, {"999999": ["cat"]})
    merged = pseudo_label.main(_label_args(coco, tmp_path, tags))
    out = capsys.readouterr().out
    assert "2 tagged image(s) to label; skipped: 3 images without tags, 1 empty tag lists, 1 tagged ids not in the " \
           "json" in out
    assert json.loads((tmp_path / "pseudo.json").read_text()) == merged
    # the same detections as the Predictor gives for that image and vocabulary (boxes in stored pixels, unclipped)
    predictor = Predictor.from_checkpoint(golden.path("checkpoint_tiny.pth"), device="cpu")
    raw = json.loads(tags.read_text())
    dataset = pseudo_label.open_dataset(_label_args(coco, tmp_path, tags))
    expected = []
    for image_id in sorted(int(k) for k, v in raw.items() if v and int(k) in dataset.ids):
        [dets] = predictor.predict(dataset.load_image(image_id), raw[str(image_id)], score_threshold=0.001,
                                   clip_boxes=False)
        for box, score, name in zip(dets.boxes.tolist(), dets.scores.tolist(), dets.names):
            expected.append((image_id, name, round(score, 5), [round(v, 2) for v in
                                                                (box[0], box[1], box[2] - box[0], box[3] - box[1])]))
    got = [(b["image_id"], b["class_label"], round(b["score"], 5), [round(v, 2) for v in b["bbox"]]) for b in merged]
    assert got == expected and len(got) > 0
    assert all(b["class_label"] in raw[str(b["image_id"])] and b["score"] >= 0.001 for b in merged)
    # a second run finds every image done and writes the same file
    again = pseudo_label.main(_label_args(coco, tmp_path, tags))
    assert again == merged and "2 image(s) already labelled, 0 to go" in capsys.readouterr().out
    # a part of another run (here: another threshold into the same file) is refused, not merged
    with pytest.raises(ValueError, match="was written by a run with other settings"):
        pseudo_label.main(_label_args(coco, tmp_path, tags, "--det_thr", "0.5"))


def test_pseudo_label_bad_inputs(coco, tmp_path):
    long_name = "a very long class name that the text encoder of this checkpoint cuts off"
    with pytest.raises(ValueError, match=r"1 tag name\(s\) are longer than .*--text_len 15"):
        pseudo_label.main(_label_args(coco, tmp_path, _tags(coco, tmp_path, {"785": [long_name]})))
    tags = tmp_path / "other.json"
    tags.write_text(json.dumps({"1": ["cat"], "2": ["dog"]}))
    with pytest.raises(ValueError, match="none of its 2 image ids is an image of the training json"):
        pseudo_label.main(_label_args(coco, tmp_path, tags))
    with pytest.raises(ValueError, match="give either --cls_annotation_path"):
        pseudo_label.main(_label_args(coco, tmp_path, tags, "--vocabulary_json", str(tags)))
    with pytest.raises(ValueError, match=r"--det_thr 1.5: expected a score in \[0, 1\]"):
        pseudo_label.main(_label_args(coco, tmp_path, tags, "--det_thr", "1.5"))


@pytest.mark.slow
def test_pseudo_label_two_processes_merge_to_one_processs_result(coco, tmp_path):
    tags = _tags(coco, tmp_path, {str(i): ["cat", "dog"] for i in sorted(
        i["id"] for i in coco["gt"]["train"]["images"])[3:]})
    single = pseudo_label.main(_label_args(coco, tmp_path / "one", tags))
    (tmp_path / "two").mkdir()
    argv = ["--resume", golden.path("checkpoint_tiny.pth"), "--coco_path", str(coco["root"]), "--cls_annotation_path",
            str(tags), "--det_thr", "0.001", "--output", str(tmp_path / "two" / "pseudo.json"), "--device", "cpu"]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "tools/pseudo_label.py", *argv], cwd=ROOT, env=launch_environ(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    merged = json.loads((tmp_path / "two" / "pseudo.json").read_text())

    def by_class(boxes):  # per (image, class): its scores, best first
        grouped = {}
        for b in boxes:
            grouped.setdefault((b["image_id"], b["class_label"]), []).append(b["score"])
        return {k: sorted(v, reverse=True) for k, v in grouped.items()}

    # the same boxes, up to the float rounding of 1 vs 2 threads
    ours, theirs = by_class(merged), by_class(single)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-4), key
    assert (tmp_path / "two" / "pseudo_rand1.json").is_file()


@pytest.mark.slow
def test_training_with_pseudo_boxes(coco, tmp_path, monkeypatch):
    """`main.py --pseudo_box`: the pseudo boxes' names join the category list of their batches and the run
    trains and evaluates as without them."""
    images = sorted(i["id"] for i in coco["gt"]["train"]["images"])
    entries = [{"image_id": i, "bbox": [2, 3, 30, 25], "class_label": "zebra crossing", "score": 0.9} for i in images]
    path = _pseudo_file(tmp_path / "pseudo.json", entries)
    seen = []
    import engine

    original = engine.with_pseudo_categories
    monkeypatch.setattr(engine, "with_pseudo_categories",
                        lambda c, t: seen.append(original(c, t)) or seen[-1])
    run_main(coco["root"], tmp_path / "run", "--pseudo_box", str(path), "--split_class_p", "0")
    record = json.loads((tmp_path / "run" / "log.txt").read_text().splitlines()[-1])
    assert record["epoch"] == 0 and math.isfinite(record["train_loss"])
    used = [categories for categories, targets in seen if any(t.get("pseudo_labels") for t in targets)]
    assert used and all(c[-1] == "zebra crossing" and len(c) == 49 for c in used)


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["coco", "lvis"])
def test_cora_plus_pipeline_script(dataset, repo, tmp_path):
    """`bash tools/cora_plus.sh <coco|lvis> R50 1`: tags from captions (COCO), pseudo boxes from the checkpoint,
    then the localizer config trained with them; a second call skips the finished stages."""
    from tests.tiny_lvis import make_tiny_lvis

    root = tmp_path / dataset
    if dataset == "coco":
        info = make_tiny_coco(root)
        images = sorted(i["id"] for i in info["gt"]["train"]["images"])
        captions = {"annotations": [{"image_id": i, "caption": "a cat next to a red bicycle"} for i in images]}
        (root / "annotations" / "captions_train2017.json").write_text(json.dumps(captions))
        pseudo = root / "annotations" / "pseudo_label_thr0.2.json"
    else:
        make_tiny_lvis(root)
        pseudo = root / "pseudo_label_thr0.2.json"
    tiny = ["--model_path", golden.path("clip_tiny.pt"), "--region_prompt_path", golden.path("region_prompt_tiny.pth"),
            "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "64", "--num_queries", "30",
            "--text_dim", "64", "--batch_size", "2", "--num_workers", "0", "--device", "cpu", "--epochs", "1"]
    env = launch_environ(OMP_NUM_THREADS="2", data_path=str(root), lvis_path=str(root),
                         CHECKPOINT=golden.path("checkpoint_tiny.pth"), PSEUDO_ARGS="--det_thr 0.001 --device cpu",
                         LOCALIZER_ARGS=" ".join(tiny))
    done = subprocess.run(["bash", "tools/cora_plus.sh", dataset, "R50", "1"], cwd=repo, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    boxes = json.loads(pseudo.read_text())
    assert boxes and all(b["score"] >= 0.001 for b in boxes)
    if dataset == "coco":
        assert {b["class_label"] for b in boxes} <= {"cat", "bicycle"}
    else:  # only the rare classes are kept
        assert {b["class_label"] for b in boxes} <= {"ball (toy)", "cider"}
    folder = "COCO" if dataset == "coco" else "LVIS"
    run = repo / "logs" / folder / "R50_dab_ovd_3enc_apm128_splcls0.2_relabel_noinit" / "RN50_plus"
    info = json.loads(next(run.glob("run_*.json")).read_text())
    assert info["args"]["pseudo_box"] == str(pseudo)
    assert json.loads((run / "log.txt").read_text().splitlines()[-1])["epoch"] == 0
    again = subprocess.run(["bash", "tools/cora_plus.sh", dataset, "R50", "1"], cwd=repo, env=env,
                           capture_output=True, text=True)
    assert again.stdout.count("exists, skipped") == (2 if dataset == "coco" else 1), again.stdout
