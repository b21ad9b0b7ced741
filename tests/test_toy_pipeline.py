"""The miniature world end to end (CI variant of tools/toy/run_all.sh) and the bundled toy model's accuracy.

    python -m pytest -q tests/test_toy_pipeline.py

* The shipped model (assets/toy, made by tools/toy/run_all.sh + tools.toy.bundle) detects on scenes of
  a world it has never seen (200 scenes of seed 1; it was trained on seed 0) with novel AP50 >= 30 and base >= 50,
  through the same predictor `bash demo.sh` uses, scored by the project's COCO OVD evaluator.
* `bash demo.sh` without arguments runs that model on the bundled toy scenes.
* run_all.sh at toy-of-toy size (3 to 4 minutes): every stage runs through the project's own commands and
  configs, in order, and leaves its output (world, CLIP archive, region prompt, relabelled json,
  localizer log with the 16 COCO OVD numbers), its CLIP classifies crops and boxes far above chance;
  a second call skips every stage.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import demo
from tests.conftest import HANG_GUARD_S, launch_environ
from tests.helpers import toy_dataset_args
from tools.toy.make_dataset import make_dataset
from tools.toy.world import CLASS_NAMES

pytestmark = pytest.mark.slow  # launchers and several epochs: minutes
ROOT = Path(__file__).resolve().parents[1]
FRESH_VAL_IMAGES = 200


@pytest.fixture(scope="module")
def fresh_world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy_seed1")
    make_dataset(out=root, seed=1, train=0, val=FRESH_VAL_IMAGES, captions=0, test_per_class=0, workers=1)
    return root


def test_bundled_model_finds_novel_classes_in_an_unseen_world(fresh_world, tmp_path):
    from datasets import build_dataset, get_coco_api_from_dataset
    from datasets.ovd_eval import CocoOVDEvaluator
    from models.predictor import Predictor

    val = build_dataset("val", toy_dataset_args(fresh_world))
    assert val.category_list == list(CLASS_NAMES)
    predictor = Predictor.from_checkpoint(demo.TOY_CHECKPOINT, clip_archive=demo.TOY_CLIP,
                                          region_prompt=demo.TOY_PROMPT, device="cpu", disk_cache=False)
    assert predictor.image_scale == pytest.approx(0.32)
    files = [val.img_folder / val.coco.imgs[i]["file_name"] for i in val.ids]
    evaluator = CocoOVDEvaluator(get_coco_api_from_dataset(val), val.label2catid, verbose=False)
    with torch.no_grad():
        for image_id, detections in zip(val.ids, predictor.predict(files, list(CLASS_NAMES), batch_size=4)):
            evaluator.update({image_id: {"boxes": detections.boxes, "labels": detections.labels,
                                         "scores": detections.scores}})
    evaluator.accumulate()
    stats = evaluator.summarize()
    base_ap50, novel_ap50 = stats[12], stats[13]
    # Chance is ~0 (a box of the right class within IoU 0.5 by luck). The bounds are issue 6's targets for the
    # bundled model; the bundled CORA+ model scores novel 60.5 / base 74.2 here (58.3 / 75.9 on its own val set,
    # assets/toy/provenance.json; the CORA model before it 49.5 / 72.7).
    assert novel_ap50 >= 30, stats
    assert base_ap50 >= 50, stats


def test_demo_sh_without_arguments_runs_the_bundled_model(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != demo.CHECKPOINT_ENV}
    env.update(PYTHON=sys.executable, CORA_CACHE_DIR=str(tmp_path / "cache"))
    if demo.DEFAULT_CHECKPOINT.exists():
        pytest.skip(f"{demo.DEFAULT_CHECKPOINT} exists: demo.sh runs it instead of the bundled model")
    proc = subprocess.run(["bash", str(ROOT / "demo.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bundled miniature model" in proc.stdout
    samples = sorted(demo.TOY_SAMPLES_DIR.iterdir())
    drawn = sorted((tmp_path / "outputs" / "demo").glob("*.png"))
    assert [p.stem for p in drawn] == [p.stem for p in samples]
    rows = json.loads((tmp_path / "outputs" / "demo" / "detections.json").read_text())
    assert rows and {r["category_name"] for r in rows} <= set(CLASS_NAMES)
    assert all(r["score"] >= 0.2 and r["category_id"] == CLASS_NAMES.index(r["category_name"]) + 1 for r in rows)


def test_shortened_pipeline_runs_every_stage(repo, tmp_path):
    view = repo
    env = launch_environ(data_path=str(tmp_path / "world"),
                         WORLD_ARGS="--train 300 --val 60 --captions 3000 --test_per_class 4 --workers 1",
                         CLIP_ARGS="--steps 150",
                         PROMPT_ARGS="--epochs 1",
                         LOCALIZER_ARGS="--epochs 1 --eval_every_epoch 1 --num_queries 30")
    proc = subprocess.run(["bash", "tools/toy/run_all.sh"], cwd=view, env=env, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    world = tmp_path / "world"
    clip_report = json.loads((world / "clip_toy.json").read_text())
    assert clip_report["steps"] == 150 and clip_report["region_pairs"] is True
    # 150 steps of CLIP training (about 2 minutes here) already classify held-out crops and val boxes, novel
    # ones included, far above chance (1/16); measured: crops 20% (novel 31%), boxes 26% (novel 21%). The
    # localizer needs far more steps than CI can give (this world with 5 epochs, 4 minutes in all: novel AP50
    # 0.2); the bundled model's test above guards detection accuracy.
    chance = 1 / len(CLASS_NAMES)
    assert clip_report["zero_shot"]["all"] > 2 * chance, clip_report["zero_shot"]
    assert set(torch.load(view / "logs" / "region_prompt_toy.pth", weights_only=True)) == {
        "attnpool.positional_embedding"}
    accuracy = json.loads((view / "logs/toy/region_prompt_toy/toy/region_accuracy.json").read_text())
    assert set(accuracy["results"]) == {"CLIP (no prompt)", "region prompt", "CLIP (no prompt), pre-matching path",
                                        "region prompt, pre-matching path"}
    clip_boxes = accuracy["results"]["CLIP (no prompt)"]
    assert clip_boxes["all"] > 2 * chance and clip_boxes["novel"] > 2 * chance, clip_boxes
    relabelled = json.loads((world / "annotations" / "instances_train2017_base_RN50relabel.json").read_text())
    base = json.loads((world / "annotations" / "instances_train2017_base.json").read_text())
    assert [a["id"] for a in relabelled["annotations"]] == [a["id"] for a in base["annotations"]]
    run_dir = view / "logs/toy/toy_dab_ovd_apm_splcls0.2_relabel/toy"
    logged = [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in logged] == [0] and len(logged[0]["test_coco_eval_bbox"]) == 16
    assert "novel AP50" in proc.stdout
    times = json.loads((view / "logs/toy/run_all_times.json").read_text())
    assert list(times) == ["world", "clip", "region_prompt", "relabel", "localizer"]

    again = subprocess.run(["bash", "tools/toy/run_all.sh"], cwd=view, env=env, capture_output=True, text=True,
                           timeout=HANG_GUARD_S)
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 5, again.stdout[-2000:]
