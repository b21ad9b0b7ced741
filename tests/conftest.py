import os
import sys

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
