"""tools/: checkpoint inspection."""
import os
import subprocess
import sys

import pytest

from tests import golden
from tools.inspect_checkpoint import inspect
from util.checkpoint import save_checkpoint


def test_inspect_golden_checkpoint():
    info = inspect(golden.path("checkpoint_tiny.pth"))
    # the miniature model's counts (../shared/golden/README.md)
    assert info["trainable parameters"] == 4_625_988
    assert info["model_ema"] is True and info["epoch"] == 0
    # the flags of ../shared/golden/config.json that fix the network, as a run must repeat them
    flags = info["network flags"].split()
    for flag, value in (("--num_queries", "300"), ("--enc_layers", "2"), ("--dec_layers", "3"),
                        ("--text_len", "15"), ("--nheads", "8"), ("--text_dim", "64"), ("--dim_feedforward", "256")):
        assert flags[flags.index(flag) + 1] == value, flag
    assert "--anchor_pre_matching" in flags and "--epochs >=25" in info["network flags"]


def test_inspect_reports_keys_that_do_not_fit(tmp_path):
    checkpoint = dict(golden.load("checkpoint_tiny.pth"))
    model = dict(checkpoint["model"])
    del model["objectness_embed.weight"]
    broken = tmp_path / "broken.pth"
    save_checkpoint({"model": model, "epoch": 3}, broken)
    with pytest.raises(ValueError, match=r"missing keys: objectness_embed\.weight"):
        inspect(str(broken))


@pytest.mark.slow
def test_inspect_command_line():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "tools", "inspect_checkpoint.py"),
                          golden.path("checkpoint_tiny.pth")], capture_output=True, text=True, check=True)
    assert "loads strictly: True" in out.stdout
