"""Exact linear assignment in plain torch, batched over many cost matrices (CPU and CUDA).

`torch_assignment(costs)` is a drop-in `solver` for `HungarianMatcher` with the contract of
`scipy_assignment` (below): per `[R_b, C_b]` matrix, `(row_indices, col_indices)` of a
minimum-cost assignment of min(R_b, C_b) pairs, CPU int64, rows ascending.

Algorithm: shortest augmenting paths with potentials (the Jonker–Volgenant family, in the
rectangular form that scipy's `linear_sum_assignment` also uses), vectorised over a padded batch.

* Orientation. Each matrix is solved with rows ≤ columns (the matcher's `[Q, T]` costs, Q ≫ T, are
  transposed to `[T, Q]`), so the number of augmentations is the small side and every step of an
  augmentation is one vector operation over the long side.
* Duals. Row potentials `u`, column potentials `v ≤ 0`, reduced costs `c_ij − u_i − v_j ≥ 0`; an
  assigned pair has reduced cost 0 and a column with `v_j < 0` is assigned. These are the LP
  optimality conditions of the rectangular problem (every row assigned, a column at most once), so
  when every row is assigned the assignment is optimal (LP duality, complementary slackness).
* Start. `u_i = min_j c_ij`, `v = 0` satisfies the conditions for any partial assignment that
  gives rows their arg-min column; each contested column goes to its lowest claiming row. With
  Q ≫ T most rows are assigned here, which is why the batch needs few augmentation rounds.
* Augmentation. For each still-free row, Dijkstra on reduced costs (all ≥ 0) reaches the nearest
  free column; the potential update keeps the conditions and the path flips one more row into the
  assignment. Among equally short columns an unassigned one is preferred (ends the search early).
* Concurrent searches. Each round runs the searches of up to `SEARCHES_PER_ROUND` free rows of every
  matrix at once, all from the same state, and applies a search only if no lower-numbered search of
  the same matrix scanned one of its columns. Applied searches then touch disjoint columns and rows,
  and applying them one after the other would give the same result: a search's potential update
  only raises the reduced costs of its own scanned columns, which the others never chose as their
  nearest, and changes owners and row potentials only inside its own scanned set. The first search of
  each matrix always applies, so every round makes progress; with Q ≫ T most searches are disjoint
  and a batch needs a few rounds instead of one per free row.
* Constant rows (every column the same cost, e.g. a GT box all of whose pairs the matcher masks with
  99) take no part: whatever the other rows take, any leftover column is as good (R ≤ C leaves
  enough), so they get the lowest-numbered free columns at the end. Without this they would all claim
  column 0 at the start and each need a search of its own.

The loops are over rounds and search steps (≤ T each), never over queries; every step is a handful
of tensor operations on `[searches, Q]`. On square or nearly square problems (not the matcher's) the
searches are long and mostly sequential, and this solver is far slower than scipy.

Arithmetic is float64 (as scipy): costs are float32 or float64 and the duals accumulate sums of
them, so where the optimum is unique the indices equal scipy's, and with ties the total cost is the
same. Non-finite costs raise `ValueError` (an assignment with ±inf or NaN cost has no meaningful
optimum here; the matcher's "masked" cost is the finite 99).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment

Indices = tuple[torch.Tensor, torch.Tensor]

__all__ = ["NonFiniteCostError", "SOLVER_NAMES", "auto_assignment", "scipy_assignment", "solve_padded", "solver_for",
           "torch_assignment"]

SOLVER_NAMES: tuple[str, ...] = ("auto", "torch", "scipy")
SEARCHES_PER_ROUND = 8  # concurrent shortest-path searches per matrix (see solve_padded)


class NonFiniteCostError(ValueError):
    """A cost matrix holds inf or NaN; `batch_indices` are the offending matrices of the batch."""

    def __init__(self, batch_indices: list[int]):
        self.batch_indices = batch_indices
        super().__init__(f"linear assignment: cost matrices {batch_indices} contain non-finite entries (inf or "
                         "NaN); a finite cost is needed for every pair (the matcher masks pairs with 99)")


def solve_padded(cost: torch.Tensor, num_rows: torch.Tensor, num_cols: torch.Tensor) -> torch.Tensor:
    """Minimum-cost assignment of every row of each padded matrix; rows ≤ columns in each.

    cost `[N, R, C]` (float32 or float64; padding must be finite, e.g. 0, and is ignored), num_rows /
    num_cols `[N]` int64 on cost's device with `num_rows[n] <= num_cols[n]`. Returns col4row `[N, R]`
    int64: the column of every valid row, −1 for padded rows. Raises `NonFiniteCostError` if a valid
    entry is inf or NaN. All sums are float64 (float32 entries convert exactly).
    """
    n, r_max, c_max = cost.shape
    device = cost.device
    if n == 0 or r_max == 0:
        return torch.full((n, r_max), -1, dtype=torch.int64, device=device)
    rows = torch.arange(r_max, device=device)
    row_valid = rows[None] < num_rows[:, None]  # [N, R]
    col_valid = torch.arange(c_max, device=device)[None] < num_cols[:, None]  # [N, C]
    low, high, best = _row_extremes(cost, col_valid)
    # A constant row costs the same in every column: whatever the others take, it can have any column
    # left over (there are enough, R ≤ C), so it is left out of the search and placed at the end. The
    # matcher's GT boxes without a class-consistent overlapping query are such rows (all 99).
    constant = row_valid & (low == high)
    active_row = row_valid & ~constant
    state = _initial_assignment(low, best, active_row, c_max)
    while True:
        free = active_row & (state.col4row[:, :r_max] < 0)
        # at most SEARCHES_PER_ROUND per matrix: overlapping searches are thrown away, and on dense
        # (square-like) problems most of them overlap
        free &= free.to(torch.int32).cumsum(dim=1) <= SEARCHES_PER_ROUND
        elem, start = free.nonzero(as_tuple=True)  # searches, by matrix
        if elem.numel() == 0:
            break
        paths = _shortest_paths(cost, elem, start, state, col_valid)
        _apply_searches(state, paths, elem, start, c_max)
    return _place_constant_rows(state, constant, row_valid, col_valid)


@dataclass
class _Duals:
    """The solver's state: potentials `u [N,R]`, `v [N,C]` (float64) and the partial assignment, each table
    with one spare slot at the end that takes the writes of searches that must not write."""

    u: torch.Tensor
    v: torch.Tensor
    col4row: torch.Tensor  # [N, R+1]
    row4col: torch.Tensor  # [N, C+1]


@dataclass
class _Paths:
    """One round of concurrent shortest-path searches (Dijkstra on reduced costs), one per free row."""

    spc: torch.Tensor  # [S, C] shortest path cost to each column
    path: torch.Tensor  # [S, C] the row each column was reached from
    scanned_rows: torch.Tensor  # [S, R]
    scanned_cols: torch.Tensor  # [S, C]
    min_val: torch.Tensor  # [S] length of the augmenting path
    sink: torch.Tensor  # [S] the free column it reached
    steps: int


def _row_extremes(cost: torch.Tensor, col_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row the minimum and maximum over the valid columns and the arg-minimum; refuses inf / NaN."""
    # One pass over the batch: NaN propagates through min and max, ±inf shows in one of them.
    low, high = torch.aminmax(cost, dim=2)
    if not bool((torch.isfinite(low) & torch.isfinite(high)).all()):
        raise NonFiniteCostError(sorted(set((~(torch.isfinite(low) & torch.isfinite(high))).any(1)
                                            .nonzero().flatten().tolist())))
    if bool(col_valid.all()):
        return low, high, cost.argmin(dim=2)
    inf = torch.tensor(float("inf"), dtype=cost.dtype, device=cost.device)
    low, best = torch.where(col_valid[:, None, :], cost, inf).min(dim=2)
    high = torch.where(col_valid[:, None, :], cost, -inf).amax(dim=2)
    return low, high, best


def _initial_assignment(low: torch.Tensor, best: torch.Tensor, active_row: torch.Tensor, c_max: int) -> _Duals:
    """Row minima as row potentials, each contested column to its lowest claiming row."""
    n, r_max = low.shape
    device = low.device
    rows = torch.arange(r_max, device=device)
    u = torch.where(active_row, low.to(torch.float64), 0.0)  # [N, R]
    v = torch.zeros(n, c_max, dtype=torch.float64, device=device)
    claim = torch.where(active_row, rows[None].expand(n, r_max), r_max)  # inactive rows never win
    flat = (torch.arange(n, device=device)[:, None] * c_max + best).flatten()
    winner = torch.full((n * c_max,), r_max, dtype=torch.int64, device=device)
    winner.scatter_reduce_(0, flat, claim.flatten(), reduce="amin")
    wins = active_row & (winner[flat].view(n, r_max) == rows[None])
    col4row = torch.full((n, r_max + 1), -1, dtype=torch.int64, device=device)
    col4row[:, :r_max] = torch.where(wins, best, -1)
    row4col = torch.full((n, c_max + 1), -1, dtype=torch.int64, device=device)
    win_n, win_r = wins.nonzero(as_tuple=True)
    row4col[win_n, best[win_n, win_r]] = win_r
    return _Duals(u, v, col4row, row4col)


def _shortest_paths(cost: torch.Tensor, elem: torch.Tensor, start: torch.Tensor, state: _Duals,
                    col_valid: torch.Tensor) -> _Paths:
    """Dijkstra from each free row `start` of matrix `elem` to its nearest free column, all at once, from the
    same state; among equally short columns an unassigned one is preferred (ends the search early)."""
    num, (_, r_max, c_max) = elem.numel(), cost.shape
    device = cost.device
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=device)
    search = torch.arange(num, device=device)
    u_s, v_s, owner = state.u[elem], state.v[elem], state.row4col[elem, :c_max]
    spc = torch.full((num, c_max), float("inf"), dtype=torch.float64, device=device)
    path = torch.full((num, c_max), -1, dtype=torch.int64, device=device)
    scanned_rows = torch.zeros(num, r_max, dtype=torch.bool, device=device)
    scanned_cols = torch.zeros(num, c_max, dtype=torch.bool, device=device)
    remaining = col_valid[elem].clone()
    min_val = torch.zeros(num, dtype=torch.float64, device=device)
    row = start.clone()
    sink = torch.zeros(num, dtype=torch.int64, device=device)
    searching = torch.ones(num, dtype=torch.bool, device=device)
    steps = 0
    while bool(searching.any()):  # the only host sync of a step
        steps += 1
        if steps > r_max + 1:  # each step scans an assigned column's row: at most R − 1 of them, then a free one
            raise RuntimeError("linear assignment: no augmenting path found (should be impossible when "
                               "rows ≤ columns and costs are finite)")
        scanned_rows[search, row] |= searching
        reduced = (min_val[:, None] + cost[elem, row].to(torch.float64)
                   - u_s[search, row][:, None] - v_s)  # [S, C]
        better = searching[:, None] & remaining & (reduced < spc)
        spc = torch.where(better, reduced, spc)
        path = torch.where(better, row[:, None], path)
        open_spc = torch.where(remaining, spc, inf)
        lowest = open_spc.min(dim=1).values
        at_lowest = remaining & (open_spc == lowest[:, None])
        at_lowest_free = at_lowest & (owner < 0)
        col = torch.where(at_lowest_free.any(dim=1), at_lowest_free.to(torch.int8).argmax(dim=1),
                          at_lowest.to(torch.int8).argmax(dim=1))
        min_val = torch.where(searching, lowest, min_val)
        scanned_cols[search, col] |= searching
        remaining[search, col] &= ~searching
        col_owner = owner[search, col]
        reached = searching & (col_owner < 0)
        sink = torch.where(reached, col, sink)
        row = torch.where(searching & ~reached, col_owner, row)
        searching &= ~reached
    return _Paths(spc, path, scanned_rows, scanned_cols, min_val, sink, steps)


def _apply_searches(state: _Duals, paths: _Paths, elem: torch.Tensor, start: torch.Tensor, c_max: int) -> None:
    """Apply each search whose columns no lower-numbered search of its matrix scanned (module doc): update the
    potentials and flip its augmenting path; the others are dropped (their rows search again next round)."""
    num = elem.numel()
    n, r_max = state.u.shape
    device = elem.device
    rows = torch.arange(r_max, device=device)
    cols = torch.arange(c_max, device=device)
    search = torch.arange(num, device=device)
    first = torch.full((n * c_max,), num, dtype=torch.int64, device=device)
    scan_flat = (elem[:, None] * c_max + cols[None]).expand(num, c_max)
    scanned_cols = paths.scanned_cols
    first.scatter_reduce_(0, scan_flat[scanned_cols], search[:, None].expand(num, c_max)[scanned_cols],
                          reduce="amin")
    clash = scanned_cols & (first[scan_flat] != search[:, None])
    accepted = ~clash.any(dim=1)

    # potentials: start row += min_val; other scanned rows += min_val − spc(their column);
    # scanned columns −= min_val − spc (≥ 0, so v stays ≤ 0 and unassigned columns keep v = 0).
    # Applied searches touch disjoint rows and columns, so their updates simply add up.
    min_val, spc = paths.min_val, paths.spc
    own_spc = spc.gather(1, state.col4row[elem, :r_max].clamp(min=0))
    is_start = rows[None] == start[:, None]
    du = torch.where(paths.scanned_rows & ~is_start, min_val[:, None] - own_spc, 0.0)
    du = du + torch.where(is_start, min_val[:, None], 0.0)
    state.u.index_add_(0, elem, torch.where(accepted[:, None], du, 0.0))
    dv = torch.where(scanned_cols & accepted[:, None], min_val[:, None] - spc, 0.0)
    state.v.index_add_(0, elem, -dv)

    # flip each applied path sink → start (at most `steps` edges); others write to the spare slots
    going = accepted.clone()
    col = paths.sink
    for _ in range(paths.steps):
        prev_row = paths.path[search, col].clamp(min=0)
        prev_col = state.col4row[elem, prev_row]
        state.row4col[elem, torch.where(going, col, c_max)] = prev_row
        state.col4row[elem, torch.where(going, prev_row, r_max)] = col
        going = going & (prev_row != start)
        col = torch.where(going, prev_col, col).clamp(min=0)


def _place_constant_rows(state: _Duals, constant: torch.Tensor, row_valid: torch.Tensor,
                         col_valid: torch.Tensor) -> torch.Tensor:
    """The final col4row: constant rows take the lowest-numbered columns left free, in row order."""
    r_max, c_max = constant.shape[1], col_valid.shape[1]
    result = state.col4row[:, :r_max]
    if bool(constant.any()):
        free_cols = col_valid & (state.row4col[:, :c_max] < 0)
        free_order = (~free_cols).to(torch.int8).argsort(dim=1, stable=True)  # free columns first, ascending
        rank = constant.to(torch.int64).cumsum(dim=1) - 1  # k-th constant row of its matrix
        placed = free_order.gather(1, rank.clamp(min=0))
        result = torch.where(constant, placed, result)
    return torch.where(row_valid, result, -1)


def torch_assignment(costs: Sequence[torch.Tensor]) -> list[Indices]:
    """Minimum-cost assignment of every matrix of `costs`, solved together in one padded batch.

    `costs[b]` is `[R_b, C_b]` (any sizes, 0 allowed, all on one device; e.g. the matcher's
    `[Q, T_b]` of every image and decoder layer). Returns per matrix `(row_indices, col_indices)`,
    CPU int64 of length min(R_b, C_b), rows ascending, as `scipy_assignment`. Raises `ValueError`
    on non-finite entries.
    """
    results: list[Indices | None] = [None] * len(costs)
    work: list[tuple[int, torch.Tensor, bool]] = []  # (position, oriented cost [r ≤ c], transposed)
    for k, c in enumerate(costs):
        if c.ndim != 2 or not c.is_floating_point():
            raise ValueError(f"torch_assignment: cost matrix {k} is {c.dtype} {tuple(c.shape)}, expected a 2-D "
                             "floating tensor")
        if c.shape[0] == 0 or c.shape[1] == 0:
            empty = torch.empty(0, dtype=torch.int64)
            results[k] = (empty, empty.clone())
            continue
        transposed = c.shape[0] > c.shape[1]
        work.append((k, c.detach().t() if transposed else c.detach(), transposed))
    if work:
        device = work[0][1].device
        sizes = [tuple(c.shape) for _, c, _ in work]
        r_max = max(r for r, _ in sizes)
        c_max = max(c for _, c in sizes)
        num_rows = torch.as_tensor([r for r, _ in sizes], dtype=torch.int64)
        num_cols = torch.as_tensor([c for _, c in sizes], dtype=torch.int64)
        padded = _pad([c for _, c, _ in work], r_max, c_max, num_rows, device)
        try:
            col4row = solve_padded(padded, num_rows.to(device), num_cols.to(device)).cpu()  # one copy to host
        except NonFiniteCostError as err:
            raise NonFiniteCostError([work[i][0] for i in err.batch_indices]) from None
        for i, (k, c, transposed) in enumerate(work):
            assigned = col4row[i, : c.shape[0]]
            oriented_rows = torch.arange(c.shape[0], dtype=torch.int64)
            if transposed:  # oriented rows are the original columns
                order = assigned.argsort()
                results[k] = (assigned[order], oriented_rows[order])
            else:
                results[k] = (oriented_rows, assigned.clone())
    return [r for r in results if r is not None]


def _pad(mats: list[torch.Tensor], r_max: int, c_max: int, num_rows: torch.Tensor,
         device: torch.device) -> torch.Tensor:
    """The oriented matrices in one zero-padded `[N, r_max, c_max]` batch (float64 if any input is)."""
    dtype = torch.float64 if any(m.dtype == torch.float64 for m in mats) else torch.float32
    n = len(mats)
    if all(m.shape[1] == c_max for m in mats):
        # the matcher's case (the same number of queries everywhere): one concatenation, one scatter
        values = torch.cat([m.to(device=device, dtype=dtype) for m in mats])  # [ΣR, C]
        batch_of_row = torch.repeat_interleave(torch.arange(n), num_rows)
        starts = torch.cumsum(num_rows, 0) - num_rows
        row_in_matrix = torch.arange(int(num_rows.sum())) - torch.repeat_interleave(starts, num_rows)
        padded = torch.zeros(n, r_max, c_max, dtype=dtype, device=device)
        padded[batch_of_row.to(device), row_in_matrix.to(device)] = values
        return padded
    padded = torch.zeros(n, r_max, c_max, dtype=dtype, device=device)
    for i, m in enumerate(mats):
        padded[i, : m.shape[0], : m.shape[1]] = m
    return padded


def scipy_assignment(costs: Sequence[torch.Tensor]) -> list[Indices]:
    """Minimum-cost assignment per matrix with `scipy.optimize.linear_sum_assignment` (on the CPU).

    `costs[b]` is `[Q, T_b]` (queries × that image's GT boxes, any device, T_b may be 0). Returns per image
    `(query_indices, target_indices)`, CPU int64 tensors of length min(Q, T_b), ordered by ascending query
    index — the contract every solver of `HungarianMatcher` keeps.
    """
    out = []
    for c in costs:
        rows, cols = linear_sum_assignment(c.detach().cpu().numpy())
        out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return out


def solver_for(name: str):
    """The `HungarianMatcher` solver of `--matcher_backend` (`auto`, `torch` or `scipy`)."""
    solvers = {"auto": auto_assignment, "torch": torch_assignment, "scipy": scipy_assignment}
    if name not in solvers:
        raise ValueError(f"unknown matcher backend {name!r}; expected one of {SOLVER_NAMES}")
    return solvers[name]


def auto_assignment(costs: Sequence[torch.Tensor]) -> list[Indices]:
    """The faster exact solver for where the costs live (tools/benchmark.py): on CUDA the batched
    torch solver (no per-image host copies, one batch), on the CPU scipy's compiled solver."""
    if costs and costs[0].is_cuda:
        return torch_assignment(costs)
    return scipy_assignment(costs)
