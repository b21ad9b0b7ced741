"""LVIS end to end on a tiny LVIS-v1-format dataset (tests/tiny_lvis.py): the evaluator against the lvis API,
the configs/LVIS scripts (evaluation of a checkpoint, a training epoch), region prompting and CLIP-aligned
labelling on LVIS jsons."""
from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets import build_dataset
from datasets.ovd_eval import LvisEvaluator, ovd_split
from tests import golden
from tests.conftest import ROOT, launch_environ
from tests.helpers import parsed_args
from tests.tiny_lvis import CATEGORIES, RARE_IDS, VAL_JSON, make_tiny_lvis
from util.checkpoint import load_checkpoint


def tiny_model() -> list[str]:
    """The golden miniature model's sizes and files: later flags override the config's (RN50, 1000 queries)."""
    return ["--model_path", golden.path("clip_tiny.pt"), "--region_prompt_path", golden.path("region_prompt_tiny.pth"),
            "--enc_layers", "2", "--dec_layers", "3", "--dim_feedforward", "256", "--num_queries", "300",
            "--text_dim", "64", "--batch_size", "2", "--num_workers", "0", "--device", "cpu"]
LVIS_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


@pytest.fixture(scope="module")
def lvis(tmp_path_factory):
    return make_tiny_lvis(tmp_path_factory.mktemp("lvis"))


def lvis_api_results(gt_path: Path, detections: list[dict]) -> dict[str, float]:
    """AP, APr, ... of the reference LVIS API (github.com/lvis-dataset/lvis-api, `pip install lvis`, 0.5.3)."""
    from lvis import LVIS, LVISEval, LVISResults

    gt = LVIS(str(gt_path))
    results = LVISEval(gt, LVISResults(gt, detections, max_dets=300), "bbox")
    # lvis 0.5.3 (its last release) casts with `np.float`, an alias numpy 1.24 removed; it meant float64
    had_alias = hasattr(np, "float")
    np.float = np.float64
    try:
        results.run()
    finally:
        if not had_alias:
            del np.float
    return dict(results.get_results())


def _hand_made_detections(val: dict, seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """Per val image: each ground-truth box, jittered, at a random score (some with another class), plus
    detections of classes that are verified negatives, not exhaustively annotated, or not annotated at all."""
    rng = random.Random(seed)
    ids = sorted(c["id"] for c in CATEGORIES)
    per_image: dict[int, list] = {}
    for a in val["annotations"]:
        x, y, w, h = a["bbox"]
        jitter = [rng.uniform(-0.15, 0.15) * s for s in (w, h, w, h)]
        box = [x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]]
        category = a["category_id"] if rng.random() < 0.8 else rng.choice(ids)
        per_image.setdefault(a["image_id"], []).append((category, box, rng.random()))
    for img in val["images"]:
        for category in img["neg_category_ids"] + img["not_exhaustive_category_ids"] + [rng.choice(ids)]:
            x, y = rng.uniform(0, img["width"] / 2), rng.uniform(0, img["height"] / 2)
            per_image.setdefault(img["id"], []).append((category, [x, y, x + 20, y + 25], rng.random()))
    return {image_id: {"labels": torch.tensor([ids.index(c) for c, _, _ in dets]),
                       "boxes": torch.tensor([b for _, b, _ in dets]),
                       "scores": torch.tensor([s for _, _, s in dets])} for image_id, dets in per_image.items()}


def test_lvis_evaluator_equals_the_lvis_api(lvis):
    val_path = lvis["root"] / VAL_JSON
    label2catid = sorted(c["id"] for c in CATEGORIES)
    evaluator = LvisEvaluator(str(val_path), label2catid, verbose=False)
    evaluator.update(_hand_made_detections(lvis["val"], seed=1))  # a seed under which every group has 0 < AP < 1
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    ours = evaluator.summarize()
    reference = lvis_api_results(val_path, evaluator.results_json())
    assert 0 < reference["APr"] < 1 and reference["APc"] > 0 and reference["APf"] > 0  # a case that tests something
    for key in LVIS_KEYS:
        assert ours[key] == pytest.approx(reference[key], abs=1e-6), key


def test_rare_classes_are_the_boost_and_the_novel_split(lvis):
    args = parsed_args("--dataset_file", "lvis", "--lvis_path", str(lvis["root"]), "--label_map")
    val = build_dataset("val", args)
    assert [val.label2catid[i] for i in val.novel_indices] == sorted(RARE_IDS)
    assert ovd_split(lvis["val"]["categories"])[1] == frozenset(RARE_IDS)
    train = build_dataset("train", args)
    assert train.category_list == [c["name"].replace("_", " ") for c in sorted(CATEGORIES, key=lambda c: c["id"])
                                   if c["frequency"] != "r"]
    # a json without frequencies cannot say which classes to boost: refused before anything runs
    data = dict(lvis["val"], categories=[{k: v for k, v in c.items() if k != "frequency"} for c in CATEGORIES])
    path = lvis["root"] / "nofreq" / VAL_JSON
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(data))
    for split in ("train2017", "val2017"):
        if not (path.parent / split).exists():
            (path.parent / split).symlink_to(lvis["root"] / split)
    (path.parent / "lvis_v1_train_norare.json").write_text(json.dumps(lvis["train"]))
    import main as cora_main

    args = parsed_args("--dataset_file", "lvis", "--lvis_path", str(path.parent), "--eval", "--target_class_factor",
                       "8", "--output_dir", str(path.parent / "run"), *tiny_model())
    with pytest.raises(ValueError, match="have no 'frequency'"):
        cora_main.main(args)
    assert not (path.parent / "run" / "eval.pth").exists()


def _config(repo: Path, config: str, exp: str, *extra: str, lvis_root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", f"configs/LVIS/{config}.sh", exp, "1", "local", "--lvis_path", str(lvis_root),
                           *extra], cwd=repo, env=launch_environ(OMP_NUM_THREADS="2"), capture_output=True,
                          text=True)


@pytest.mark.slow
def test_lvis_config_evaluates_a_checkpoint(lvis, repo):
    """`bash configs/LVIS/R50_...sh EXP 1 local --lvis_path ... --resume ckpt --eval`: APr / APc / APf / AP
    printed (and in the console log), a log.txt line, and the numbers the lvis API gives on the detections."""
    done = _config(repo, "R50_dab_ovd_3enc_apm128_splcls0.2_relabel_noinit", "eval", "--resume",
                   golden.path("checkpoint_tiny.pth"), "--eval", *tiny_model(), lvis_root=lvis["root"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    work = repo / "logs" / "LVIS" / "R50_dab_ovd_3enc_apm128_splcls0.2_relabel_noinit" / "eval"
    console = next(work.glob("exp_*.txt")).read_text()
    assert "maxDets=300 catIds=  r]" in console and "maxDets=300 catIds=  c]" in console
    [record] = [json.loads(line) for line in (work / "log.txt").read_text().splitlines()]
    assert record["eval"] == golden.path("checkpoint_tiny.pth")
    stats = record["test_coco_eval_bbox"]
    assert set(LVIS_KEYS) <= set(stats)
    detections = json.loads((work / "results_bbox.json").read_text())
    per_image = np.bincount([d["image_id"] for d in detections])
    assert per_image.max() <= 300 and per_image.max() > 100  # LVIS keeps 300 per image, not COCO's 100
    reference = lvis_api_results(lvis["root"] / VAL_JSON, detections)
    for key in LVIS_KEYS:
        assert stats[key] == pytest.approx(reference[key], abs=1e-6), key


@pytest.mark.slow
def test_lvis_config_trains_and_keeps_the_best_by_apr(lvis, repo):
    done = _config(repo, "R50_dab_ovd_3enc_apm128_splcls0.2_relabel_noinit", "train", "--epochs", "1",
                   *tiny_model(), lvis_root=lvis["root"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    work = repo / "logs" / "LVIS" / "R50_dab_ovd_3enc_apm128_splcls0.2_relabel_noinit" / "train"
    [record] = [json.loads(line) for line in (work / "log.txt").read_text().splitlines()]
    assert record["epoch"] == 0 and "APr" in record["test_coco_eval_bbox"]
    assert np.isfinite(record["train_loss"])
    best = load_checkpoint(work / "checkpoint.pth")["best_performance"]
    assert best == max(0.0, record["test_coco_eval_bbox"]["APr"])  # model selection by APr


@pytest.mark.slow
def test_region_prompt_and_relabel_on_lvis(lvis, tmp_path):
    """Stage 1 and 2 of the pipeline read LVIS jsons: the prompt's accuracy report splits base (common +
    frequent) from novel (rare), and the relabelled json keeps the LVIS layout with labels among its classes."""
    from tools import region_prompt as rp
    from tools import relabel as rl

    common = ["--dataset_file", "lvis", "--lvis_path", str(lvis["root"]), "--model_path", golden.path("clip_tiny.pt"),
              "--batch_size", "2", "--num_workers", "0", "--device", "cpu"]
    result = rp.main(rp.get_args_parser().parse_args(common + ["--epochs", "1", "--output",
                                                               str(tmp_path / "prompt.pth")]))
    report = result["accuracy"]["results"]["region prompt"]
    rare_boxes = sum(1 for a in lvis["val"]["annotations"] if a["category_id"] in RARE_IDS)
    assert report["boxes"]["novel"] == rare_boxes and report["boxes"]["base"] == len(lvis["val"]["annotations"]) - \
        rare_boxes
    out = rl.main(rl.get_args_parser().parse_args(common + ["--region_prompt_path", str(tmp_path / "prompt.pth"),
                                                            "--relabel_folder", str(tmp_path / "relabel")]))
    relabelled = json.loads((lvis["root"] / "lvis_v1_train_norare_RN50relabel.json").read_text())
    assert out["merge"]["total"] == len(lvis["train"]["annotations"])
    assert {a["id"] for a in relabelled["annotations"]} == {a["id"] for a in lvis["train"]["annotations"]}
    train_ids = {c["id"] for c in lvis["train"]["categories"]}
    assert {a["category_id"] for a in relabelled["annotations"]} <= train_ids
    assert relabelled["images"] == lvis["train"]["images"]


def test_lvis_config_flags_are_main_flags():
    """Every flag the LVIS configs pass is one of main.py's (tools/region_prompt.py's for the prompt configs)."""
    from main import get_args_parser
    from tools import region_prompt as rp

    for path in sorted(Path(ROOT, "configs", "LVIS").glob("*.sh")):
        text = path.read_text()
        body = text[text.index('args="') + len('args="'):]
        flags = [t for t in body[: body.index('"')].replace("\\", " ").split() if t.startswith("--")]
        parser = rp.get_args_parser() if "region_prompt" in path.name else get_args_parser()
        known = {a for action in parser._actions for a in action.option_strings}
        assert set(flags) <= known, (path.name, sorted(set(flags) - known))
