"""main.py end to end on a tiny COCO-OVD dataset of real image files and the golden miniature CLIP."""
import json
import re
import subprocess
import sys

import pytest
import torch

from tests import golden
from tests.helpers import run_main
from tests.tiny_coco import make_tiny_coco
from util.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # launchers and several epochs: minutes
@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    make_tiny_coco(root)
    return root


def run(coco_root, output_dir, *extra):
    return run_main(coco_root, output_dir, *extra)


def _log(output_dir):
    return [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(coco_root, tmp_path_factory):
    """An uninterrupted two-epoch run, the reference of the interrupted ones."""
    output_dir = tmp_path_factory.mktemp("straight")
    run(coco_root, output_dir, "--epochs", "2")
    return output_dir


def test_train_resume_and_evaluate(coco_root, straight, tmp_path):
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


def test_evaluation_a_kill_interrupted_is_finished_on_resume(coco_root, straight, tmp_path, monkeypatch):
    """Killed after epoch 0's checkpoint.pth was written but during its evaluation: started again, the run
    first evaluates and logs epoch 0, then goes on, exactly as an uninterrupted run."""
    import main as cora_main

    killed = tmp_path / "killed"
    original = cora_main.run_evaluation

    def killed_during_evaluation(*args, **kwargs):
        raise KeyboardInterrupt("killed while evaluating")

    monkeypatch.setattr(cora_main, "run_evaluation", killed_during_evaluation)
    with pytest.raises(KeyboardInterrupt):
        run(coco_root, killed, "--epochs", "2")
    assert load_checkpoint(killed / "checkpoint.pth")["epoch"] == 0 and not (killed / "log.txt").exists()
    monkeypatch.setattr(cora_main, "run_evaluation", original)
    run(coco_root, killed, "--epochs", "2")
    assert [e["epoch"] for e in _log(killed)] == [0, 1]
    for a, b in zip(_log(straight), _log(killed), strict=True):
        assert a["test_coco_eval_bbox"] == pytest.approx(b["test_coco_eval_bbox"], abs=1e-12)
        assert a["train_loss"] == b["train_loss"]
    weights = load_checkpoint(straight / "checkpoint.pth")["model"]
    for key, value in load_checkpoint(killed / "checkpoint.pth")["model"].items():
        assert torch.equal(value, weights[key]), key


def test_checkpoint_of_other_network_flags_is_refused(coco_root, tmp_path):
    from util.checkpoint import CheckpointError

    first = tmp_path / "first"
    run(coco_root, first, "--split_class_p", "0")
    ckpt = str(first / "checkpoint.pth")
    cases = (("--nheads", "4", r"--nheads: checkpoint 8, this run 4"),
             ("--text_len", "20", r"--text_len: checkpoint 15, this run 20"),
             # trained with --epochs 1 (< 25: GroupNorm in input_proj, the original's accident), evaluated with 30
             ("--epochs", "30", r"--epochs: the checkpoint's input_proj has GroupNorm .*this run's has none"))
    for flag, value, message in cases:
        with pytest.raises(CheckpointError, match=rf"--resume {ckpt} was trained with other network flags(.|\n)*"
                                                  rf"{message}"):
            run(coco_root, tmp_path / "eval", "--eval", "--resume", ckpt, flag, value)


def test_command_line_errors_are_one_message(coco_root, tmp_path):
    """`python main.py` with a bad flag or file: `main.py: error: ...` on stderr and exit status 1, no traceback."""
    from tests.conftest import ROOT, launch_environ
    from tests.helpers import main_argv

    cases = (("--coco_path", str(tmp_path / "nowhere"), "--coco_path .*nowhere does not exist"),
             ("--resume", str(tmp_path / "missing.pth"), "checkpoint .*missing.pth not found"),
             ("--resume", golden.path("clip_tiny.pt"), "is a TorchScript archive .*given as --model_path"))
    for flag, value, message in cases:
        done = subprocess.run([sys.executable, "main.py", *main_argv(coco_root, tmp_path / "run"), flag, value],
                              cwd=ROOT, env=launch_environ(), capture_output=True, text=True)
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr
        [line] = [line for line in done.stderr.splitlines() if line.startswith("main.py: error:")]
        assert re.search(message, line), line
