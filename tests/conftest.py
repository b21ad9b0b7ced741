import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The golden files were computed with 2 threads; the tolerances allow for other counts, but a
# fixed count keeps runs reproducible on any machine.
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


# How long a test waits for a subprocess, a server or a file before calling it hung: far beyond what any step
# takes on a slow, shared CI machine (a guard against hangs, never a performance check).
HANG_GUARD_S = 3600

# Set by torchrun / slurm in the calling shell; a child launcher must not inherit them.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID")


def launch_environ(**extra: str) -> dict[str, str]:
    """This process's environment plus `extra`, without launcher variables, the repository on PYTHONPATH."""
    env = dict(os.environ, PYTHONPATH=ROOT, **extra)
    for name in LAUNCH_VARIABLES:
        env.pop(name, None)
    return env


@pytest.fixture
def repo(tmp_path):
    """A working copy of the repository (symlinks) in which the configs write their relative `logs/`."""
    view = tmp_path / "repo"
    view.mkdir()
    for item in Path(ROOT).iterdir():
        if item.name not in {"logs", "outputs", "checkpoints", "data"}:
            (view / item.name).symlink_to(item)
    return view


@pytest.fixture(scope="module")
def tiny():
    """The golden miniature CORA (its checkpoint's EMA weights) in eval mode, and its PostProcess."""
    from models import build_model
    from tests import golden
    from util.checkpoint import pick_weights

    model, _, post = build_model(golden.model_args())
    model.load_state_dict(pick_weights(golden.load("checkpoint_tiny.pth"), use_ema=True), strict=True)
    return model.eval(), post["bbox"]
