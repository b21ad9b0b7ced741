"""COCO-OVD / LVIS evaluators (datasets/ovd_eval.py) and distributed helpers (util/dist.py).

Truth comes from the original's golden evaluation (`ovd_eval/`), from hand computation on tiny
hand-made sets, and (for LVIS) from numbers worked out by hand that the LVIS API also gives.
"""

from __future__ import annotations

import builtins
import os
import re
import socket
from argparse import Namespace

import numpy as np
import pytest
import torch

from datasets import ovd_eval
from datasets.coco_ovd import BASE_CATIDS, NOVEL_CATIDS
from datasets.ovd_eval import (
    STAT_NAMES,
    CocoOVDEvaluator,
    LvisEvaluator,
    limit_detections_per_image,
    merge_gathered,
    resolve_backend,
)
from tests import golden
from util import dist as dist_utils

BACKENDS = ["pycocotools", "faster-coco-eval"]


def _golden_label2catid() -> list[int]:
    table = golden.load_json("ovd_eval/expected.json")["label2catid"]
    return [table[str(i)] for i in range(len(table))]


def _golden_evaluator(backend: str, verbose: bool = False) -> CocoOVDEvaluator:
    return CocoOVDEvaluator(
        golden.path("ovd_eval/gt.json"), _golden_label2catid(), backend=backend, verbose=verbose
    )


def _run(evaluator: CocoOVDEvaluator) -> list[float]:
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    return evaluator.summarize()


def _without_timing(log: str) -> str:
    return re.sub(r"DONE \(t=[0-9.]+s\)\.", "DONE (t=…s).", log)


# ----------------------------------------------------------------------------- golden ovd_eval


def test_split_lists_match_spec():
    assert len(BASE_CATIDS) == 48 and len(NOVEL_CATIDS) == 17
    assert not set(BASE_CATIDS) & set(NOVEL_CATIDS)
    # SPEC §2.2: novel label indices into the 65-way list are exactly the novel ids.
    label2catid = _golden_label2catid()
    novel_labels = [i for i, c in enumerate(label2catid) if c in NOVEL_CATIDS]
    assert novel_labels == [4, 5, 11, 12, 15, 16, 21, 23, 27, 29, 32, 34, 45, 47, 54, 58, 63]
    assert set(label2catid) == set(BASE_CATIDS) | set(NOVEL_CATIDS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_stats(backend):
    expected = golden.load_json("ovd_eval/expected.json")
    evaluator = _golden_evaluator(backend)
    evaluator.update(golden.load("ovd_eval/detections_labels.pth"))
    stats = _run(evaluator)
    assert len(stats) == len(STAT_NAMES) == 16
    np.testing.assert_allclose(stats, expected["stats"], rtol=0, atol=1e-6)
    assert evaluator.backend == backend
    state = evaluator.eval_state()
    assert state["precision"].shape == (10, 101, 65, 4, 3)
    assert state["recall"].shape == (10, 65, 4, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_log(backend, capsys):
    expected_log = golden.load_json("ovd_eval/expected.json")["log"]
    evaluator = _golden_evaluator(backend, verbose=True)
    evaluator.update(golden.load("ovd_eval/detections_labels.pth"))
    _run(evaluator)
    printed = capsys.readouterr().out
    assert printed == evaluator.log
    got, want = _without_timing(printed).splitlines(), _without_timing(expected_log).splitlines()
    assert len(got) == len(want)
    for line, ref in zip(got, want, strict=True):
        if backend == "pycocotools" or not ref.startswith("bbox A"):
            assert line == ref
        else:
            # faster-coco-eval's precision differs from pycocotools' in the last bits, and these
            # lines print the full float.
            prefix, _, value = ref.rpartition(": ")
            assert line.startswith(prefix + ": ")
            assert float(line.rpartition(": ")[2]) == pytest.approx(float(value), abs=1e-6)


def test_golden_results_json():
    evaluator = _golden_evaluator("pycocotools")
    evaluator.update(golden.load("ovd_eval/detections_labels.pth"))
    evaluator.synchronize_between_processes()
    assert evaluator.results_json() == golden.load_json("ovd_eval/detections.json")


def test_backends_give_same_arrays():
    arrays = []
    for backend in BACKENDS:
        evaluator = _golden_evaluator(backend)
        evaluator.update(golden.load("ovd_eval/detections_labels.pth"))
        _run(evaluator)
        arrays.append(evaluator.eval_state())
    for key in ("precision", "recall"):
        np.testing.assert_allclose(arrays[0][key], arrays[1][key], rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- gathering


def test_merge_gathered_keeps_first_rank_and_sorts():
    a = (np.array([1]), np.zeros((1, 4), np.float32), np.array([0.5], np.float32))
    b = (np.array([2]), np.ones((1, 4), np.float32), np.array([0.7], np.float32))
    merged = merge_gathered([{9: a, 3: a}, {3: b, 5: b}])
    assert list(merged) == [3, 5, 9]
    assert merged[3] is a and merged[5] is b and merged[9] is a


def test_dedup_across_ranks(monkeypatch):
    """Two simulated ranks; the image they share carries different (wrong) detections on rank 1,
    so the result equals the golden stats only if rank 0's copy is kept."""
    dets = golden.load("ovd_eval/detections_labels.pth")
    ids = list(dets)
    shared = ids[5]
    rank0 = {i: dets[i] for i in ids[:6]}
    rank1 = {i: dets[i] for i in ids[5:]}
    rank1[shared] = {k: v[:1].clone() for k, v in dets[shared].items()}
    rank1[shared]["labels"][:] = 0  # a different class, so the copy matters
    evaluators = [_golden_evaluator("faster-coco-eval") for _ in range(2)]
    evaluators[0].update(rank0)
    evaluators[1].update(rank1)

    payloads = []
    monkeypatch.setattr(dist_utils, "all_gather", lambda obj: payloads.append(obj) or [obj])
    for ev in evaluators:
        ev.synchronize_between_processes()
    monkeypatch.setattr(dist_utils, "all_gather", lambda obj: list(payloads))
    evaluators[0].synchronize_between_processes()  # rank 0's view of the gather

    assert evaluators[0].img_ids == sorted(ids)
    evaluators[0].accumulate()
    stats = evaluators[0].summarize()
    np.testing.assert_allclose(stats, golden.load_json("ovd_eval/expected.json")["stats"], rtol=0, atol=1e-6)
    assert evaluators[0].results_json() == golden.load_json("ovd_eval/detections.json")

    # Rank order decides: with rank 1 first, its copy of the shared image wins and stats change.
    monkeypatch.setattr(dist_utils, "all_gather", lambda obj: list(reversed(payloads)))
    evaluators[1].synchronize_between_processes()
    evaluators[1].accumulate()
    assert evaluators[1].summarize() != pytest.approx(stats)


def test_repeated_image_within_a_rank_keeps_first():
    dets = golden.load("ovd_eval/detections_labels.pth")
    evaluator = _golden_evaluator("pycocotools")
    evaluator.update(dets)
    first = next(iter(dets))
    evaluator.update({first: {k: v[:0] for k, v in dets[first].items()}})
    assert evaluator.results_json() == golden.load_json("ovd_eval/detections.json")


# ----------------------------------------------------------------------------- hand-made cases


def _tiny_gt(annotations: list[dict]) -> dict:
    """Two images 640x480; person (1, base), bicycle (2, base), dog (18, novel)."""
    return {
        "images": [{"id": 1, "width": 640, "height": 480}, {"id": 2, "width": 640, "height": 480}],
        "annotations": annotations,
        "categories": [
            {"id": 1, "name": "person"},
            {"id": 2, "name": "bicycle"},
            {"id": 18, "name": "dog"},
        ],
    }


def _gt_box(ann_id: int, image_id: int, cat: int, xywh: list[float]) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cat,
        "bbox": xywh,
        "area": xywh[2] * xywh[3],
        "iscrowd": 0,
    }


def _pred(labels: list[int], boxes_xyxy: list[list[float]], scores: list[float]) -> dict:
    return {
        "labels": torch.tensor(labels, dtype=torch.int64),
        "boxes": torch.tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_hand_computed(backend):
    """Image 1: a large person and a large dog; one exact person box, a dog box of IoU 0.62
    (15500 / 25000) and a spurious bicycle box (bicycle has no ground truth, so it is left out of
    every mean). Image 2: nothing.

    person: AP 1 at every IoU. dog: matched at IoU 0.5/0.55/0.6 only → AP 3/10, AP50 1, AP75 0.
    AP = (1 + 0.3)/2 = 0.65; AP50 = 1; AP75 = 0.5; AR the same numbers (one detection each).
    Base AP50 = person's 100; novel AP50 = dog's 100; recalls at IoU 0.5 both 100.
    """
    gt = _tiny_gt([_gt_box(1, 1, 1, [100, 100, 200, 200]), _gt_box(2, 1, 18, [300, 100, 100, 250])])
    label2catid = [1, 2, 18]
    evaluator = CocoOVDEvaluator(gt, label2catid, backend=backend, verbose=False)
    evaluator.update(
        {
            1: _pred(
                [0, 2, 1], [[100, 100, 300, 300], [300, 100, 400, 255], [0, 0, 50, 50]], [0.9, 0.8, 0.7]
            ),
            2: _pred([], [], []),
        }
    )
    stats = _run(evaluator)
    expected = [0.65, 1.0, 0.5, -1, -1, 0.65, 0.65, 0.65, 0.65, -1, -1, 0.65, 100.0, 100.0, 100.0, 100.0]
    np.testing.assert_allclose(stats, expected, rtol=0, atol=1e-12)
    assert evaluator.per_category() == {
        1: pytest.approx((100.0, 100.0)),
        2: (None, None),
        18: pytest.approx((100.0, 100.0)),
    }
    assert "| Novel | 100.00 |" in evaluator.table()
    assert evaluator.results_json()[1] == {
        "image_id": 1,
        "category_id": 18,
        "bbox": [300.0, 100.0, 100.0, 155.0],
        "score": pytest.approx(0.8),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_missed_novel_and_no_novel_ground_truth(backend):
    """A perfect person box and a dog that is not detected → base AP50 100, novel AP50 0.
    Without any novel ground truth the novel means are nan (numpy's mean of nothing, as printed
    by the original)."""
    gt = _tiny_gt([_gt_box(1, 1, 1, [10, 10, 100, 120]), _gt_box(2, 2, 18, [50, 50, 200, 100])])
    evaluator = CocoOVDEvaluator(gt, [1, 2, 18], backend=backend, verbose=False)
    evaluator.update({1: _pred([0], [[10, 10, 110, 130]], [0.5]), 2: _pred([], [], [])})
    stats = _run(evaluator)
    # pycocotools divides by tp + fp + eps, so a perfect precision is 1 - 1e-16.
    assert stats[12:] == pytest.approx([100.0, 0.0, 100.0, 0.0], abs=1e-9)
    assert stats[1] == pytest.approx(0.5)

    gt = _tiny_gt([_gt_box(1, 1, 1, [10, 10, 100, 120])])
    evaluator = CocoOVDEvaluator(gt, [1, 2, 18], backend=backend, verbose=False)
    evaluator.update({1: _pred([0], [[10, 10, 110, 130]], [0.5])})
    stats = _run(evaluator)
    assert stats[12] == pytest.approx(100.0) and stats[14] == pytest.approx(100.0)
    assert np.isnan(stats[13]) and np.isnan(stats[15])
    assert "bbox AP target: nan" in evaluator.log


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_detections(backend):
    """No detection anywhere: pycocotools' loadRes([]) would fail; the result must be "all
    missed": 0 where the ground truth has boxes (large person, medium dog), -1 elsewhere."""
    gt = _tiny_gt([_gt_box(1, 1, 1, [0, 0, 200, 200]), _gt_box(2, 2, 18, [0, 0, 50, 50])])
    evaluator = CocoOVDEvaluator(gt, [1, 2, 18], backend=backend, verbose=False)
    evaluator.update({1: _pred([], [], []), 2: _pred([], [], [])})
    stats = _run(evaluator)
    assert evaluator.results_json() == []
    assert stats == [0, 0, 0, -1, 0, 0, 0, 0, 0, -1, 0, 0, 0.0, 0.0, 0.0, 0.0]


def test_only_updated_images_are_evaluated():
    """As in the original, ground-truth images never passed to update() do not count."""
    gt = _tiny_gt([_gt_box(1, 1, 1, [10, 10, 100, 120]), _gt_box(2, 2, 1, [10, 10, 100, 120])])
    evaluator = CocoOVDEvaluator(gt, [1, 2, 18], backend="pycocotools", verbose=False)
    evaluator.update({1: _pred([0], [[10, 10, 110, 130]], [0.5])})
    assert _run(evaluator)[1] == pytest.approx(1.0, abs=1e-12)


def test_input_errors():
    gt = _tiny_gt([_gt_box(1, 1, 1, [10, 10, 100, 120])])
    evaluator = CocoOVDEvaluator(gt, {0: 1, 1: 2, 2: 18}, backend="pycocotools", verbose=False)
    with pytest.raises(ValueError, match=r"labels \[3\] outside label2catid \(expected 0..2\)"):
        evaluator.update({1: _pred([3], [[0, 0, 1, 1]], [0.5])})
    with pytest.raises(ValueError, match="image id 7"):
        evaluator.update({7: _pred([0], [[0, 0, 1, 1]], [0.5])})
    with pytest.raises(ValueError, match="boxes"):
        evaluator.update(
            {1: {"labels": torch.tensor([0]), "scores": torch.tensor([0.5]), "boxes": torch.zeros(1, 3)}}
        )
    with pytest.raises(ValueError, match=r"category ids \[5\]"):
        CocoOVDEvaluator(gt, [1, 5], backend="pycocotools")
    with pytest.raises(ValueError, match="unknown COCO evaluation backend"):
        CocoOVDEvaluator(gt, [1], backend="detectron")
    with pytest.raises(RuntimeError, match="no image"):
        CocoOVDEvaluator(gt, [1], backend="pycocotools").accumulate()


def test_auto_backend_prefers_faster_coco_eval(monkeypatch):
    assert resolve_backend("auto") == "faster-coco-eval"
    assert resolve_backend("faster_coco_eval") == "faster-coco-eval"
    monkeypatch.setattr(ovd_eval, "faster_coco_eval_available", lambda: False)
    assert resolve_backend("auto") == "pycocotools"


def test_ground_truth_object_not_modified():
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = _tiny_gt([_gt_box(1, 1, 1, [10, 10, 100, 120])])
    coco.createIndex()
    evaluator = CocoOVDEvaluator(coco, [1, 2, 18], backend="pycocotools", verbose=False)
    evaluator.update({1: _pred([0], [[10, 10, 110, 130]], [0.5])})
    _run(evaluator)
    assert "ignore" not in coco.anns[1]


# ----------------------------------------------------------------------------- LVIS


def _lvis_gt() -> dict:
    """Three images, one category per frequency group (r=1, c=2, f=3), all boxes large."""

    def ann(ann_id, image_id, cat, xywh):
        return {
            "id": ann_id,
            "image_id": image_id,
            "category_id": cat,
            "bbox": xywh,
            "area": xywh[2] * xywh[3],
        }

    return {
        "images": [
            {
                "id": 1,
                "width": 400,
                "height": 400,
                "neg_category_ids": [2],
                "not_exhaustive_category_ids": [],
            },
            {
                "id": 2,
                "width": 400,
                "height": 400,
                "neg_category_ids": [],
                "not_exhaustive_category_ids": [3],
            },
            {"id": 3, "width": 400, "height": 400, "neg_category_ids": [], "not_exhaustive_category_ids": []},
        ],
        "annotations": [
            ann(1, 1, 1, [10, 10, 200, 150]),
            ann(2, 2, 2, [50, 60, 120, 180]),
            ann(3, 3, 3, [100, 100, 250, 200]),
        ],
        "categories": [
            {"id": 1, "name": "r_cat", "frequency": "r"},
            {"id": 2, "name": "c_cat", "frequency": "c"},
            {"id": 3, "name": "f_cat", "frequency": "f"},
        ],
    }


def _lvis_predictions() -> dict:
    return {
        # exact r box (0.9); a c box in an image where c is a verified negative → false positive (0.8)
        1: _pred([1, 2], [[10, 10, 210, 160], [200, 200, 350, 390]], [0.9, 0.8]),
        # exact c box (0.5); an unmatched f box where f is not exhaustively annotated → ignored (0.9)
        2: _pred([2, 3], [[50, 60, 170, 240], [0, 0, 150, 150]], [0.5, 0.9]),
        # f: a false positive (0.95) above the exact box (0.6); r is neither present nor a
        # verified negative here → dropped (0.7)
        3: _pred([3, 3, 1], [[0, 250, 150, 390], [100, 100, 350, 300], [5, 5, 200, 200]], [0.95, 0.6, 0.7]),
    }


def test_lvis_hand_computed(capsys):
    """r: one TP → AP 1. c: FP(0.8) then TP(0.5) → interpolated precision 0.5 at every recall →
    AP 0.5. f: FP(0.95) then TP(0.6) → 0.5. AP = 2/3 at every IoU (exact boxes); every GT found."""
    evaluator = LvisEvaluator(_lvis_gt(), None)
    evaluator.update(_lvis_predictions())
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    results = evaluator.summarize()
    expected = {
        "AP": 2 / 3, "AP50": 2 / 3, "AP75": 2 / 3, "APs": -1, "APm": -1, "APl": 2 / 3,
        "APr": 1.0, "APc": 0.5, "APf": 0.5,
        "AR@300": 1.0, "ARs@300": -1, "ARm@300": -1, "ARl@300": 1.0,
    }  # fmt: skip
    assert list(results) == list(expected)
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, abs=1e-12), key
    printed = capsys.readouterr().out.splitlines()
    # LVISEval.print_results' format, e.g. its area label is the key's letter.
    assert (
        printed[6]
        == " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=300 catIds=  r] = 1.000"
    )
    assert (
        printed[10]
        == " Average Recall     (AR) @[ IoU=0.50:0.95 | area=     s | maxDets=300 catIds=all] = -1.000"
    )


def test_lvis_max_dets_is_per_image_over_all_categories():
    """With a cap of 1 each image keeps only its top detection (over all categories):
    image 2 keeps the ignored f box, so c's TP is gone (AP 0), and image 3 keeps the f false
    positive (AP 0); r keeps its TP. AP = 1/3."""
    evaluator = LvisEvaluator(_lvis_gt(), None, max_dets=1, verbose=False)
    evaluator.update(_lvis_predictions())
    evaluator.accumulate()
    results = evaluator.summarize()
    assert results["APr"] == pytest.approx(1.0) and results["APc"] == 0 and results["APf"] == 0
    assert results["AP"] == pytest.approx(1 / 3)
    assert [r["score"] for r in evaluator.results_json()] == pytest.approx([0.9, 0.9, 0.95])


def test_lvis_label_map_and_cap_order():
    # labels 0..2 mapped through label2catid reproduce the raw-id run
    evaluator = LvisEvaluator(_lvis_gt(), [1, 2, 3], verbose=False)
    evaluator.update({i: {**p, "labels": p["labels"] - 1} for i, p in _lvis_predictions().items()})
    evaluator.accumulate()
    assert evaluator.summarize()["AP"] == pytest.approx(2 / 3)
    # ties keep their order (stable sort, as LVISResults)
    dets = (np.array([5, 6, 7]), np.zeros((3, 4), np.float32), np.array([0.5, 0.9, 0.5], np.float32))
    cats, _, scores = limit_detections_per_image(dets, 2)
    assert cats.tolist() == [6, 5] and scores.tolist() == pytest.approx([0.9, 0.5])
    with pytest.raises(ValueError, match="frequency"):
        LvisEvaluator({**_lvis_gt(), "categories": [{"id": 1, "name": "x"}]})


def test_lvis_without_detections():
    """Every ground-truth image is evaluated (as LVISEval), so nothing detected → 0, not -1."""
    evaluator = LvisEvaluator(_lvis_gt(), None, verbose=False)
    evaluator.update({1: _pred([], [], [])})
    evaluator.accumulate()
    results = evaluator.summarize()
    assert (results["AP"], results["APr"], results["APc"], results["APf"], results["AR@300"]) == (
        0,
        0,
        0,
        0,
        0,
    )
    assert results["APs"] == -1


# ----------------------------------------------------------------------------- util.dist


def test_detect_none():
    env = dist_utils.detect_dist_env({"PATH": "/bin"})
    assert env == dist_utils.DistEnv(mode="none") and not env.distributed


def test_detect_torchrun():
    env = dist_utils.detect_dist_env(
        {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
         "SLURM_PROCID": "5"}  # torchrun inside a slurm allocation: torchrun's variables win
    )  # fmt: skip
    assert env == dist_utils.DistEnv("torchrun", 3, 8, 1, "10.0.0.1", 29500)
    with pytest.raises(RuntimeError, match="LOCAL_RANK"):
        dist_utils.detect_dist_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(RuntimeError, match="RANK must be an integer"):
        dist_utils.detect_dist_env({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_detect_slurm():
    base = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_NODELIST": "gpu[07-08]",
        "SLURM_JOBID": "123456",
    }
    env = dist_utils.detect_dist_env({**base, "SLURM_LOCALID": "1"}, resolve_host=dist_utils.parse_first_host)
    assert env == dist_utils.DistEnv("slurm", 5, 16, 1, "gpu07", 10000 + 123456 % 20000)
    # no SLURM_LOCALID: rank modulo the GPUs per node, as the original
    env = dist_utils.detect_dist_env(base, resolve_host=lambda nodes: "h0", cuda_device_count=lambda: 4)
    assert (env.local_rank, env.master_addr) == (1, "h0")
    env = dist_utils.detect_dist_env({**base, "MASTER_PORT": "4242"}, resolve_host=lambda nodes: "h0")
    assert env.master_port == 4242
    with pytest.raises(RuntimeError, match="SLURM_NTASKS"):
        dist_utils.detect_dist_env({"SLURM_PROCID": "0"})
    with pytest.raises(RuntimeError, match="SLURM_JOBID"):
        dist_utils.detect_dist_env({k: v for k, v in base.items() if k != "SLURM_JOBID"}, resolve_host=str)


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("node7", "node7"),
        ("a1,b2", "a1"),
        ("node[03-05,9]", "node03"),
        ("node[9,3-5]", "node9"),
        ("gpu-[1-2]-ib,cpu1", "gpu-1-ib"),
        ("rack[1-2]-node[01-04]", "rack1-node01"),
    ],
)
def test_parse_first_host(nodelist, first):
    assert dist_utils.parse_first_host(nodelist) == first


def test_first_host_without_scontrol(monkeypatch):
    monkeypatch.setattr(dist_utils.shutil, "which", lambda name: None)
    assert dist_utils.first_host("n[2-3]") == "n2"


def test_port_from_job_id():
    assert dist_utils.port_from_job_id("123456") == dist_utils.port_from_job_id("123456") == 13456
    assert dist_utils.port_from_job_id("123457") == 13457
    assert 10000 <= dist_utils.port_from_job_id("123_4") < 30000


def test_print_suppression(monkeypatch, capsys):
    monkeypatch.setattr(builtins, "print", builtins.print)  # restored after the test
    dist_utils.setup_for_distributed(False)
    print("hidden")
    print("shown", force=True)
    dist_utils.setup_for_distributed(True)
    print("master")
    assert capsys.readouterr().out == "shown\nmaster\n"


def test_single_process_helpers():
    assert not dist_utils.is_dist_avail_and_initialized()
    assert (dist_utils.get_rank(), dist_utils.get_world_size(), dist_utils.is_main_process()) == (0, 1, True)
    assert dist_utils.all_gather({"a": 1}) == [{"a": 1}]
    d = {"loss": torch.tensor(2.0)}
    assert dist_utils.reduce_dict(d) == d
    dist_utils.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def _isolated_env(monkeypatch):
    saved = dict(os.environ)
    monkeypatch.setattr(builtins, "print", builtins.print)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        os.environ.pop(name)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("mode", ["torchrun", "slurm"])
def test_one_process_gloo_group(mode, _isolated_env, monkeypatch):
    port = _free_port()
    if mode == "torchrun":
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
    else:
        monkeypatch.setattr(dist_utils.shutil, "which", lambda name: None)
        os.environ.update(
            SLURM_PROCID="0",
            SLURM_NTASKS="1",
            SLURM_NODELIST="localhost",
            SLURM_JOBID="77",
            MASTER_PORT=str(port),
        )
    args = Namespace(device="cpu")
    dist_utils.init_distributed_mode(args)
    assert (args.distributed, args.rank, args.world_size, args.gpu, args.dist_backend) == (
        True,
        0,
        1,
        0,
        "gloo",
    )
    assert dist_utils.is_dist_avail_and_initialized() and dist_utils.get_world_size() == 1
    if mode == "slurm":
        assert os.environ["MASTER_ADDR"] == "localhost" and os.environ["RANK"] == "0"
    assert dist_utils.all_gather({"x": [1, 2]}) == [{"x": [1, 2]}]
    assert dist_utils.collective_device().type == "cpu"
    dist_utils.barrier()


def test_no_env_is_not_distributed(_isolated_env):
    args = Namespace(device="cpu")
    info = dist_utils.init_distributed_mode(args)
    assert info.mode == "none"
    assert (args.distributed, args.rank, args.world_size, args.gpu) == (False, 0, 1, 0)


def _two_rank_worker(rank: int, port: int, out_dir: str) -> None:
    """One rank of a real 2-process gloo group: collectives and the evaluator's gather."""
    import json

    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    args = Namespace(device="cpu")
    dist_utils.init_distributed_mode(args)
    try:
        gathered = dist_utils.all_gather({"rank": rank})
        reduced = dist_utils.reduce_dict({"b": torch.tensor(2.0 * rank), "a": torch.tensor(rank + 1.0)})
        summed = dist_utils.reduce_dict({"a": torch.tensor(rank + 1.0)}, average=False)
        dets = golden.load("ovd_eval/detections_labels.pth")
        ids = list(dets)
        # DistributedSampler-like split: rank 1 is padded with rank 0's first image.
        mine = ids[:6] if rank == 0 else ids[6:] + ids[:1]
        evaluator = _golden_evaluator("faster-coco-eval")
        evaluator.update({i: dets[i] for i in mine})
        stats = _run(evaluator)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(
                {
                    "gathered": gathered,
                    "reduced": {k: v.item() for k, v in reduced.items()},
                    "summed": summed["a"].item(),
                    "stats": stats,
                    "n_results": len(evaluator.results_json()),
                },
                f,
            )
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_group(tmp_path, _isolated_env):
    import json

    import torch.multiprocessing as mp

    mp.spawn(_two_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = golden.load_json("ovd_eval/expected.json")["stats"]
    n_results = len(golden.load_json("ovd_eval/detections.json"))
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            out = json.load(f)
        assert out["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert out["reduced"] == {"a": 1.5, "b": 1.0}
        assert out["summed"] == 3.0
        np.testing.assert_allclose(out["stats"], expected, rtol=0, atol=1e-6)
        assert out["n_results"] == n_results
