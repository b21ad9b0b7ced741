"""demo.py / demo.sh: inputs, vocabularies, drawing, the JSON file, --dataset, and the missing-checkpoint message.

The model is the golden miniature checkpoint cut to 30 queries (random weights: the boxes mean
nothing, the plumbing is what is tested).
"""
import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import demo
from datasets.coco_ovd import COCO_OVD_CATEGORIES, COCO_OVD_CATEGORY_IDS
from models.predictor import Predictor
from tests import golden
from tests.conftest import HANG_GUARD_S
from tests.helpers import cut_queries, golden_checkpoint_copy
from tests.tiny_coco import make_tiny_coco
from util.checkpoint import save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COFFEE = os.path.join(ROOT, "assets", "samples", "coffee.png")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CORA_CACHE_DIR", str(tmp_path / "cora_cache"))


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "small.pth"
    save_checkpoint(golden_checkpoint_copy(cut_queries), path)
    return path


def _run_demo_sh(args, env_extra, cwd):
    env = {k: v for k, v in os.environ.items() if k != demo.CHECKPOINT_ENV}
    env.update(env_extra)
    env["PYTHON"] = sys.executable
    return subprocess.run(["bash", os.path.join(ROOT, "demo.sh"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)


def test_demo_sh_without_checkpoint_says_what_is_missing(tmp_path):
    missing = tmp_path / "nowhere" / "cora_rn50.pth"
    photo = os.path.join(ROOT, "assets", "samples", "chelsea.jpg")
    # a checkpoint named by the variable but absent: an error, not the bundled toy model
    runs = [_run_demo_sh([], {demo.CHECKPOINT_ENV: str(missing)}, tmp_path)]
    if not demo.DEFAULT_CHECKPOINT.exists():  # the shipped state: photos given, no argument, no variable, no file
        runs.append(_run_demo_sh(["--input", photo], {}, tmp_path))
    for run, path in zip(runs, [missing, demo.DEFAULT_CHECKPOINT]):
        assert run.returncode != 0
        err = run.stderr
        assert f"the default checkpoint {path} does not exist" in err
        assert "github.com/tgxs002/CORA" in err and "drive.google.com" in err
        assert "--resume /path/to/checkpoint.pth" in err and "miniature model of toy shapes" in err
        assert not (tmp_path / "outputs").exists(), "nothing may be drawn without a model"
    wrong = _run_demo_sh(["--resume", str(tmp_path / "typo.pth")], {}, tmp_path)
    assert wrong.returncode != 0 and f"--resume {tmp_path / 'typo.pth'}: checkpoint file not found" in wrong.stderr


def test_collect_inputs(tmp_path):
    image = Image.new("RGB", (8, 8))
    (tmp_path / "a").mkdir()
    image.save(tmp_path / "a" / "2.png")
    image.save(tmp_path / "a" / "1.JPG")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images here")
    a = tmp_path / "a"
    found = demo.collect_inputs([str(a), str(a / "*.png"), str(a / "notes.txt")])
    assert found == [a / "1.JPG", a / "2.png", a / "notes.txt"]  # sorted, deduplicated, files as given
    with pytest.raises(demo.DemoError, match="empty: the directory holds no image files"):
        demo.collect_inputs([str(tmp_path / "empty")])
    with pytest.raises(demo.DemoError, match=r"matches no image files \(1 matches in all\)"):
        demo.collect_inputs([str(tmp_path / "empty" / "*")])
    with pytest.raises(demo.DemoError, match="missing.jpg: no such file or directory"):
        demo.collect_inputs([str(tmp_path / "missing.jpg")])


def test_vocabulary_choice(tmp_path):
    parse = demo.get_parser().parse_args
    names, ids, novel = demo.choose_vocabulary(parse([]))
    assert names == list(COCO_OVD_CATEGORIES) and ids == list(COCO_OVD_CATEGORY_IDS) and novel is None
    names, ids, _ = demo.choose_vocabulary(parse(["--custom_vocabulary", " cat, remote  control,,cat,"]))
    assert names == ["cat", "remote control"] and ids is None
    with pytest.raises(demo.DemoError, match="use one of them"):
        demo.choose_vocabulary(parse(["--vocabulary", "coco", "--custom_vocabulary", "cat"]))
    with pytest.raises(demo.DemoError, match="needs --custom_vocabulary"):
        demo.choose_vocabulary(parse(["--vocabulary", "custom"]))
    with pytest.raises(demo.DemoError, match=r"--custom_vocabulary ' , ': .*at least one name"):
        demo.choose_vocabulary(parse(["--custom_vocabulary", " , "]))
    # an empty list given on purpose is an error, not the COCO vocabulary
    with pytest.raises(demo.DemoError, match=r"needs --custom_vocabulary .*given: ''"):
        demo.choose_vocabulary(parse(["--custom_vocabulary", ""]))
    with pytest.raises(demo.DemoError, match="pass --lvis_json /path/to/lvis_v1_val.json"):
        demo.choose_vocabulary(parse(["--vocabulary", "lvis"]))
    lvis = tmp_path / "lvis.json"
    lvis.write_text(json.dumps({"categories": [
        {"id": 3, "name": "traffic_light", "frequency": "f"}, {"id": 1, "name": "aerosol_can", "frequency": "c"},
        {"id": 2, "name": "alarm_clock", "frequency": "r"}]}))
    names, ids, rare = demo.choose_vocabulary(parse(["--vocabulary", "lvis", "--lvis_json", str(lvis)]))
    assert names == ["aerosol can", "alarm clock", "traffic light"] and ids == [1, 2, 3] and rare == [1]
    lvis.write_text("{}")
    with pytest.raises(demo.DemoError, match="expected an LVIS json"):
        demo.choose_vocabulary(parse(["--vocabulary", "lvis", "--lvis_json", str(lvis)]))


def test_coco_category_ids_are_the_ovd_jsons():
    cats = sorted(golden.load_json("ovd_eval/gt.json")["categories"], key=lambda c: c["id"])
    assert [c["name"] for c in cats] == list(COCO_OVD_CATEGORIES)
    assert [c["id"] for c in cats] == list(COCO_OVD_CATEGORY_IDS)


def test_annotate_draws_inside_the_image_and_only_near_boxes():
    image = Image.fromarray(np.full((120, 200, 3), 90, np.uint8))
    boxes = torch.tensor([[0.0, 0.0, 60.0, 40.0],  # at the top-left corner: label goes inside
                          [150.0, 60.0, 199.9, 119.9],  # at the right edge: label shifted left
                          [40.0, 50.0, 100.0, 110.0]])
    labels, names, scores = [0, 1, 0], ["cat", "a very long phrase", "cat"], [0.9, 0.8, 0.7]
    drawn, regions = demo.annotate(image, boxes, labels, names, scores)
    assert drawn.size == image.size
    for x0, y0, x1, y1 in regions:
        assert 0 <= x0 <= x1 < 200 and 0 <= y0 <= y1 < 120
    changed = np.any(np.asarray(drawn) != np.asarray(image), axis=-1)
    allowed = np.zeros_like(changed)
    for x0, y0, x1, y1 in regions:
        allowed[y0:y1 + 1, x0:x1 + 1] = True
    assert changed.any() and not (changed & ~allowed).any(), "drawn outside the detections' regions"
    pixels = np.asarray(drawn)
    # Left edge of the third box, below its label: the class colour of 'cat' (the first box's too).
    assert tuple(pixels[100, 40]) == demo.class_colour(0) == tuple(pixels[30, 0])
    assert tuple(pixels[110, 150]) == demo.class_colour(1)
    assert len({demo.class_colour(i) for i in range(demo.PALETTE_SIZE)}) == demo.PALETTE_SIZE


@pytest.mark.slow
def test_demo_end_to_end_matches_the_predictor(small_checkpoint, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    wide = Image.open(COFFEE).convert("RGB").resize((300, 120), Image.BILINEAR)
    wide.save(inputs / "wide.jpg", quality=95)
    paths = [COFFEE, str(inputs / "wide.jpg")]
    predictor = Predictor.from_checkpoint(small_checkpoint, device="cpu")
    unfiltered = predictor.predict(paths, list(COCO_OVD_CATEGORIES), max_detections=6)
    # A threshold between the coffee photo's scores, so that it removes some detections.
    threshold = round(float(unfiltered[0].scores[2:4].mean()), 6)
    expected = []
    for d in unfiltered:  # the predictor's own thresholding is tested in test_predictor.py
        keep = d.scores >= threshold
        expected.append(replace(d, boxes=d.boxes[keep], scores=d.scores[keep], labels=d.labels[keep],
                                names=[n for n, k in zip(d.names, keep.tolist()) if k]))
    assert 0 < sum(len(d) for d in expected) < sum(len(d) for d in unfiltered)
    out = tmp_path / "out"
    argv = ["--input", COFFEE, str(inputs / "*.jpg"), "--output", str(out), "--resume", str(small_checkpoint),
            "--confidence-threshold", str(threshold), "--max-detections", "6", "--cpu"]
    assert demo.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["coffee.png", "detections.json", "wide.png"]
    rows = json.load(open(out / "detections.json"))
    assert len(rows) == sum(len(d) for d in expected)
    for image_id, (path, dets) in enumerate(zip(paths, expected)):
        mine = [r for r in rows if r["image_id"] == image_id]
        assert len(mine) == len(dets) and all(r["file_name"] == path for r in mine)
        for row, box, score, name, label in zip(mine, dets.boxes, dets.scores, dets.names, dets.labels):
            x0, y0, x1, y1 = box.tolist()
            assert row["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=1e-3)
            assert row["score"] == pytest.approx(float(score), abs=1e-6)
            assert row["category_name"] == name
            assert row["category_id"] == COCO_OVD_CATEGORY_IDS[int(label)]
        original = Image.open(path).convert("RGB")
        written = Image.open(out / f"{os.path.splitext(os.path.basename(path))[0]}.png")
        assert written.size == original.size and written.mode == "RGB"
        redrawn, regions = demo.annotate(original, dets.boxes, dets.labels.tolist(), dets.names,
                                         dets.scores.tolist())
        if path == COFFEE:  # lossless input: the PNG is exactly the input plus the drawing
            assert np.array_equal(np.asarray(written), np.asarray(redrawn))
            changed = np.any(np.asarray(written) != np.asarray(original), axis=-1)
            allowed = np.zeros_like(changed)
            for x0, y0, x1, y1 in regions:
                allowed[y0:y1 + 1, x0:x1 + 1] = True
            assert changed.any() and not (changed & ~allowed).any()
            # The best detection is drawn last: its box's bottom edge has its class colour.
            x0, y0, x1, y1 = (round(v) for v in dets.boxes[0].tolist())
            bottom = min(y1, original.height - 1)
            assert tuple(np.asarray(written)[bottom, (x0 + x1) // 2]) == demo.class_colour(int(dets.labels[0]))


def test_demo_reports_unreadable_inputs_and_goes_on(small_checkpoint, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "red.png")
    Image.new("RGB", (2000, 10)).save(tmp_path / "thin.png")  # 7 x 1400 after the resize: too thin for layer4
    out = tmp_path / "out"
    argv = ["--input", *(str(tmp_path / n) for n in ("broken.png", "red.png", "thin.png")), "--output", str(out),
            "--resume", str(small_checkpoint), "--custom_vocabulary", "red square,cat", "--batch-size", "3"]
    assert demo.main(argv) == 1
    err = capsys.readouterr().err
    assert "broken.png: skipped: image (" in err and "cannot be read as an image" in err
    assert "thin.png: skipped:" in err and "at least 31 pixels" in err
    assert "2 of 3 input(s) skipped" in err
    assert sorted(p.name for p in out.iterdir()) == ["detections.json", "red.png"]
    rows = json.load(open(out / "detections.json"))
    assert {r["file_name"] for r in rows} <= {str(tmp_path / "red.png")}
    assert all("category_id" not in r and r["category_name"] in ("red square", "cat") for r in rows)


def test_dataset_mode_draws_the_first_images_of_the_split(small_checkpoint, tmp_path, capsys):
    data = make_tiny_coco(tmp_path / "coco")
    out = tmp_path / "vis"
    argv = ["--dataset", "--coco_path", str(data["root"]), "--num_images", "2", "--output", str(out),
            "--resume", str(small_checkpoint), "--confidence-threshold", "0", "--max-detections", "3", "--show_gt"]
    assert demo.main(argv) == 0
    val = data["gt"]["val"]
    first = sorted(val["images"], key=lambda i: i["id"])[:2]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(os.path.splitext(i["file_name"])[0] + ".png"
                                                                 for i in first)
    rows = json.load(open(out / "detections.json"))
    assert {r["image_id"] for r in rows} == {i["id"] for i in first} and len(rows) == 6
    ids = {c["id"]: c["name"] for c in val["categories"]}
    assert all(ids[r["category_id"]] == r["category_name"] for r in rows)
    assert "[2/2]" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        demo.main(["--dataset", "--vocabulary", "lvis_typo"])
    assert demo.main(["--dataset", "--custom_vocabulary", "cat", "--resume", str(small_checkpoint)]) == 2
