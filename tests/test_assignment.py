"""The batched torch assignment solver (models/assignment.py) against scipy, and the matcher on it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from models.assignment import NonFiniteCostError, auto_assignment, solve_padded, solver_for, torch_assignment
from models.config import ModelConfig
from models.matcher import MASKED_COST, build_matcher, scipy_assignment
from tests import golden
from tests.helpers import parsed_args

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _check_against_scipy(costs: list[torch.Tensor], results, *, unique: bool) -> None:
    """Valid assignment of min(R, C) pairs, rows ascending, CPU int64; total cost = scipy's (1e-6 relative);
    the same indices as scipy when the optimum is unique."""
    assert len(results) == len(costs)
    for k, (c, (rows, cols)) in enumerate(zip(costs, results, strict=True)):
        c64 = c.detach().cpu().double().numpy()
        ref_rows, ref_cols = linear_sum_assignment(c64)
        assert rows.dtype == cols.dtype == torch.int64 and rows.device.type == cols.device.type == "cpu"
        assert len(rows) == len(cols) == min(c.shape), (k, tuple(c.shape))
        assert torch.equal(rows, rows.sort().values) and len(set(rows.tolist())) == len(rows)
        assert len(set(cols.tolist())) == len(cols)
        if len(rows):
            assert 0 <= rows.min() and rows.max() < c.shape[0] and 0 <= cols.min() and cols.max() < c.shape[1]
        total, ref_total = c64[rows.numpy(), cols.numpy()].sum(), c64[ref_rows, ref_cols].sum()
        assert abs(total - ref_total) <= 1e-6 * max(1.0, abs(ref_total)), (k, tuple(c.shape), total, ref_total)
        if unique:
            assert np.array_equal(rows.numpy(), ref_rows) and np.array_equal(cols.numpy(), ref_cols), k


def _shapes(gen: torch.Generator, count: int, max_side: int) -> list[tuple[int, int]]:
    """Square, wide, tall and matcher-like (many rows, few columns) shapes, including empty ones."""
    shapes = []
    for i in range(count):
        a, b = (int(x) for x in torch.randint(1, max_side + 1, (2,), generator=gen))
        kind = i % 5
        empty = (0, b) if a % 2 else (a, 0)
        shapes.append([(a, a), (a, b + a), (a + b, a), (4 * max_side, b % 12), empty][kind])
    return shapes


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_continuous_random_costs_equal_scipy_indices(device, dtype):
    """Continuous random costs: the optimum is unique (almost surely), so the indices equal scipy's."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):  # 10 batches × 150 matrices
        costs = [torch.rand(s, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device) * 10
                 for s in _shapes(gen, 150, 24)]
        _check_against_scipy(costs, torch_assignment(costs), unique=True)


@pytest.mark.parametrize("device", DEVICES)
def test_integer_ties_give_scipys_total_cost(device):
    gen = torch.Generator().manual_seed(2)
    for levels in (2, 4, 10):
        costs = [torch.randint(0, levels, s, generator=gen).float().to(device) for s in _shapes(gen, 300, 16)]
        _check_against_scipy(costs, torch_assignment(costs), unique=False)
    # every entry equal: any assignment is optimal
    costs = [torch.full(s, 3.0, device=device) for s in [(5, 5), (7, 3), (3, 7), (300, 4)]]
    _check_against_scipy(costs, torch_assignment(costs), unique=False)


@pytest.mark.parametrize("device", DEVICES)
def test_large_masked_constants(device):
    """The matcher's 99 on most pairs (as with --remove_misclassified), whole rows and columns masked."""
    gen = torch.Generator().manual_seed(3)
    costs = []
    for i, shape in enumerate(_shapes(gen, 400, 20)):
        c = torch.rand(shape, generator=gen) * 4 - 2
        c[torch.rand(shape, generator=gen) < [0.5, 0.9, 1.0][i % 3]] = MASKED_COST
        if shape[0] > 2 and shape[1] > 2:
            c[0] = MASKED_COST
            c[:, 1] = MASKED_COST
        costs.append(c.to(device))
    _check_against_scipy(costs, torch_assignment(costs), unique=False)
    # large offsets (1e6): float64 sums keep the unique optimum
    large = [torch.rand(1000, t, generator=gen) * 1e3 + 1e6 for t in (1, 5, 50)]
    _check_against_scipy([c.to(device) for c in large], torch_assignment([c.to(device) for c in large]), unique=True)


@pytest.mark.parametrize("device", DEVICES)
def test_matcher_sized_batch(device):
    """Q = 300 queries × T ≤ 60 boxes, 12 matrices at once (images × layers), incl. T = 0."""
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        sizes = torch.randint(0, 61, (12,), generator=gen).tolist() + [0]
        costs = [torch.randn(300, t, generator=gen).to(device) for t in sizes]
        _check_against_scipy(costs, torch_assignment(costs), unique=True)


def test_empty_inputs():
    assert torch_assignment([]) == []
    shapes = [(0, 0), (0, 5), (5, 0), (3, 2), (0, 1)]
    results = torch_assignment([torch.rand(s) for s in shapes])
    assert [len(r) for r, _ in results] == [0, 0, 0, 2, 0]
    assert all(r.dtype == torch.int64 and c.dtype == torch.int64 for r, c in results)
    out = solve_padded(torch.zeros(0, 3, 4), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    assert out.shape == (0, 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_costs_raise(device, bad):
    costs = [torch.rand(6, 3), torch.rand(4, 4), torch.rand(2, 5)]
    costs[1][2, 3] = bad
    with pytest.raises(NonFiniteCostError, match=r"cost matrices \[1\] contain non-finite"):
        torch_assignment([c.to(device) for c in costs])
    with pytest.raises(ValueError):  # NonFiniteCostError is a ValueError
        torch_assignment([torch.full((2, 2), bad, device=device)])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="2-D floating"):
        torch_assignment([torch.rand(2, 2, 2)])
    with pytest.raises(ValueError, match="2-D floating"):
        torch_assignment([torch.ones(2, 2, dtype=torch.int64)])
    with pytest.raises(ValueError, match="unknown matcher backend"):
        solver_for("lapjv")


def test_backend_selection():
    assert solver_for("torch") is torch_assignment and solver_for("scipy") is scipy_assignment
    assert solver_for("auto") is auto_assignment
    costs = [torch.rand(50, 4), torch.rand(50, 0)]
    for (r, c), (rr, rc) in zip(auto_assignment(costs), scipy_assignment(costs), strict=True):
        assert torch.equal(r, rr) and torch.equal(c, rc)
    assert build_matcher(ModelConfig()).solver is auto_assignment  # the default
    for name in ("auto", "torch", "scipy"):
        cfg = ModelConfig.from_args(parsed_args("--matcher_backend", name))
        assert build_matcher(cfg).solver is solver_for(name)


# --------------------------------------------------------------------------- golden


TRAIN_FILES = ["train_step.pth", "train_step_split.pth", "train_step_empty_target.pth"]


def _args(backend: str) -> ModelConfig:
    return ModelConfig(dec_layers=3, remove_misclassified=True, matcher_backend=backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", TRAIN_FILES)
def test_golden_matches_and_losses_with_torch_backend(name, device):
    """The original's outputs through our matcher with the torch solver: its matches (per anchor) and its
    loss dict; the cost matrices of all layers solved in one batch give the same matches."""
    from models.criterion import build_criterion

    ref = golden.load(name)
    criterion = build_criterion(_args("torch"), build_matcher(_args("torch")))
    to = lambda d: {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in d.items()}
    outputs = to(ref["outputs"])
    outputs["aux_outputs"] = [to(a) for a in ref["outputs"]["aux_outputs"]]
    targets = [to(t) for t in ref["criterion_targets"]]
    anchors = ref["anchor_index"]
    layers = [outputs] + outputs["aux_outputs"]
    all_costs = []
    for layer, theirs in zip(layers, ref["matcher_indices"], strict=True):
        ours = criterion.matcher(layer, targets)
        all_costs += criterion.matcher.cost_matrices(layer, targets)
        for b, ((q, t), (rq, rt)) in enumerate(zip(ours, theirs, strict=True)):
            assert q.dtype == torch.int64 and torch.equal(q, q.sort().values)
            got = {(int(anchors[b, i]), int(j)) for i, j in zip(q, t, strict=True)}
            want = {(int(anchors[b, i]), int(j)) for i, j in zip(rq, rt, strict=True)}
            assert got == want, (name, layer, b)
    # one batched call for all layers (what the criterion does): the same assignments
    batched = torch_assignment(all_costs)
    for (r, c), (sr, sc) in zip(batched, scipy_assignment(all_costs), strict=True):
        assert torch.equal(r, sr) and torch.equal(c, sc)
    per_layer = [criterion.matcher(layer, targets) for layer in layers]
    for got, want in zip(criterion.matcher.match_layers(layers, targets), per_layer, strict=True):
        assert all(torch.equal(a, b) for pair_a, pair_b in zip(got, want, strict=True)
                   for a, b in zip(pair_a, pair_b, strict=True))
    loss_dict = criterion(outputs, targets)
    for k, v in ref["loss_dict"].items():
        assert abs(loss_dict[k].item() - v.item()) <= max(1e-4 * abs(v.item()), 1e-6), k

