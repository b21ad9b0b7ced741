"""main.py end to end on a tiny COCO-OVD dataset of real image files and the golden miniature CLIP."""
import json

import pytest
import torch

import main as cora_main
from tests import golden
from tests.tiny_coco import make_tiny_coco
from util.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    make_tiny_coco(root)
    return root


def run(coco_root, output_dir, *extra):
    argv = [
        "--coco_path", str(coco_root), "--output_dir", str(output_dir), "--batch_size", "2", "--epochs", "1",
        "--lr_drop", "35", "--backbone", "clip_RN50", "--model_path", golden.path("clip_tiny.pt"),
        "--text_len", "15", "--ovd", "--region_prompt_path", golden.path("region_prompt_tiny.pth"),
        "--dim_feedforward", "64", "--use_nms", "--num_queries", "30", "--anchor_pre_matching",
        "--remove_misclassified", "--condition_on_text", "--enc_layers", "1", "--dec_layers", "2",
        "--text_dim", "64", "--split_class_p", "0.5", "--model_ema", "--model_ema_decay", "0.9", "--save_best",
        "--label_version", "RN50base", "--disable_init", "--target_class_factor", "8", "--num_workers", "0",
        "--device", "cpu", *extra,
    ]
    return cora_main.main(cora_main.get_args_parser().parse_args(argv))


def _log(output_dir):
    return [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines()]


def test_train_resume_and_evaluate(coco_root, tmp_path):
    straight = tmp_path / "straight"
    run(coco_root, straight, "--epochs", "2")
    log = _log(straight)
    assert [entry["epoch"] for entry in log] == [0, 1]
    assert len(log[-1]["test_coco_eval_bbox"]) == 16
    assert all(k in log[0] for k in ("train_loss", "train_loss_ce", "train_loss_bbox_0", "test_loss", "n_parameters"))
    results = json.loads((straight / "results_bbox.json").read_text())
    assert results and set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    info = json.loads(next(straight.glob("run_*.json")).read_text())
    assert info["git_sha"] and info["args"]["num_queries"] == 30

    # killed after epoch 0, then started again with the same command: continues at epoch 1
    resumed = tmp_path / "resumed"
    run(coco_root, resumed)
    assert [entry["epoch"] for entry in _log(resumed)] == [0]
    run(coco_root, resumed, "--epochs", "2")
    assert [entry["epoch"] for entry in _log(resumed)] == [0, 1]
    a, b = load_checkpoint(straight / "checkpoint.pth"), load_checkpoint(resumed / "checkpoint.pth")
    assert a["epoch"] == b["epoch"] == 1
    for part in ("model", "model_ema"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), (part, key)
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][index][name]))
    assert _log(straight)[1]["train_loss"] == _log(resumed)[1]["train_loss"]

    # evaluating the written checkpoint reproduces the epoch's statistics
    stats = run(coco_root, tmp_path / "eval", "--eval", "--resume", str(straight / "checkpoint.pth"))
    assert stats == pytest.approx(_log(straight)[1]["test_coco_eval_bbox"], abs=1e-12)
