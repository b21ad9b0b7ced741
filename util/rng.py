"""Random states of a process, saved in checkpoints so that a resumed run continues exactly.

What a state holds (`rng_state()`): Python's, numpy's and torch's CPU generators and, when CUDA is
available, the generator of the **current** CUDA device only (`cuda`, with its index `cuda_device`).
A process uses one GPU (its rank's), so the other GPUs' generators are no part of its state; saving
every visible GPU's (`get_rng_state_all`) made a checkpoint unloadable with fewer visible GPUs and gave
every rank rank 0's states.

Multi-GPU exactness. Every rank has its own generators (seeded `seed + rank`). `checkpoint_rng_state()`
gathers every rank's state (a collective: every rank calls it) into the one checkpoint that rank 0
writes: `ranks[r]` is rank r's state, and the top-level keys are rank 0's (what a single process reads).
`set_rng_state` on a checkpoint's state restores each rank's own entry, so a run resumed with the same
number of processes continues every rank's CPU and CUDA streams exactly (the data order is the sampler's,
seeded by the epoch). Restoring is tolerant, with a printed note where it cannot be exact:

* more ranks than the checkpoint has states: the extra ranks keep their fresh `seed + rank` states;
* a state without `ranks` (a single-process run, `tools/region_prompt.py`, or a checkpoint written
  before this rule): every rank restores it, as before;
* an old checkpoint whose `cuda` is the list of all GPUs' states: the entry of the current device,
  skipped when the list is shorter (a checkpoint of 8 GPUs resumed on 1 takes entry 0);
* a CUDA state on a machine without CUDA: skipped.
"""
from __future__ import annotations

import builtins
import random

import numpy as np
import torch

from util import dist


def rng_state() -> dict:
    """This process's random states as plain tensors and numbers (weights_only-loadable): Python, numpy,
    torch's CPU generator and, when CUDA is available, the current CUDA device's generator."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        device = torch.cuda.current_device()
        state["cuda"] = torch.cuda.get_rng_state(device)
        state["cuda_device"] = device
    return state


def checkpoint_rng_state() -> dict:
    """The random states a checkpoint stores: every rank's `rng_state()` under `ranks` (gathered with
    `util.dist.all_gather`, so every rank must call this), rank 0's also at the top level."""
    ranks = dist.all_gather(rng_state())
    return {**ranks[0], "ranks": ranks}


def set_rng_state(state: dict) -> None:
    """Restore `state`: this rank's entry of a checkpoint's `ranks`, else the state as given (module doc)."""
    ranks = state.get("ranks")
    if ranks is not None:
        rank = dist.get_rank()
        if rank >= len(ranks):
            _note(f"the checkpoint holds the random states of {len(ranks)} process(es); rank {rank} keeps its "
                  f"own seed (the resumed run is not an exact continuation)")
            return
        state = ranks[rank]
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    _set_cuda_state(state.get("cuda"))


def _set_cuda_state(cuda) -> None:
    if cuda is None:
        return
    if not torch.cuda.is_available():
        _note("the checkpoint holds a CUDA random state; this machine has no CUDA: not restored")
        return
    device = torch.cuda.current_device()
    if isinstance(cuda, (list, tuple)):  # an older checkpoint: every visible GPU's state, as rank 0 saw them
        if device >= len(cuda):
            _note(f"the checkpoint holds the CUDA random states of {len(cuda)} GPU(s), none for cuda:{device}: "
                  f"not restored")
            return
        cuda = cuda[device]
    torch.cuda.set_rng_state(cuda, device)


def _note(message: str) -> None:
    """Printed on every rank (util.dist silences `print` on ranks other than 0 unless forced)."""
    force = {"force": True} if hasattr(builtins.print, "_cora_builtin_print") else {}
    print(f"note: {message}", flush=True, **force)
