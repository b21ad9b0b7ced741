"""Running on GPUs as the original did: the TF32 policy (util/numerics.py), random states that resume per rank
and per device (util/rng.py, with CUDA's functions emulated: no GPU here), and the device of each rank
(util/dist.cuda_index)."""
from __future__ import annotations

import builtins
import os
import random
from argparse import Namespace

import numpy as np
import pytest
import torch
from torch import nn

import main as cora_main
from models import inference
from models.clip import TextClassifier, build_text_classifier, read_clip_archive
from models.predictor import Predictor
from tests import golden
from util import dist, numerics, rng
from util.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture(autouse=True)
def _keep_tf32_flags():
    flags = numerics.tf32_flags()
    yield
    numerics.restore_tf32(flags)


STRICT = numerics.TF32Flags(False, False, "highest")
FAST = numerics.TF32Flags(True, True, "high")


# ---------------------------------------------------------------------------------------------- numerics
def test_tf32_policy_sets_and_restores_the_flags():
    numerics.restore_tf32(numerics.TF32Flags(False, True, "highest"))  # torch's own defaults: cuDNN in TF32
    previous = numerics.set_tf32(True)
    assert previous == (False, True, "highest") and numerics.tf32_flags() == FAST
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert numerics.set_tf32(False) == FAST and numerics.tf32_flags() == STRICT
    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    numerics.restore_tf32(previous)
    assert numerics.tf32_flags() == (False, True, "highest")


def test_strict_fp32_switches_tf32_off_and_restores_it():
    numerics.set_tf32(True)
    with numerics.strict_fp32():
        assert numerics.tf32_flags() == STRICT
    assert numerics.tf32_flags() == FAST
    seen = []

    @numerics.strict_fp32()
    def inner(depth):
        seen.append(numerics.tf32_flags())
        if depth:
            inner(depth - 1)
        raise_now = depth == 0
        if raise_now:
            raise KeyError("stop")

    with pytest.raises(KeyError):
        inner(2)  # reentrant, and restored on an exception
    assert seen == [STRICT] * 3 and numerics.tf32_flags() == FAST


def test_detection_runs_without_tf32_whatever_training_uses():
    class Probe(nn.Module):
        def forward(self, samples, categories, boost=None):
            seen.append(numerics.tf32_flags())
            raise RuntimeError("probe")

    seen = []
    numerics.set_tf32(True)  # main.py --allow_tf32
    with pytest.raises(RuntimeError, match="probe"):
        inference.detect(Probe().eval(), torch.zeros(1, 3, 32, 32), ["cat"], postprocess=None,
                         target_sizes=torch.ones(1, 2))
    assert seen == [STRICT] and numerics.tf32_flags() == FAST


def test_text_embeddings_are_computed_without_tf32(monkeypatch):
    arch, state = read_clip_archive(golden.path("clip_tiny.pt"))
    classifier = build_text_classifier(arch, 15, state)
    seen = []
    encode = TextClassifier.encode_text
    monkeypatch.setattr(TextClassifier, "encode_text", lambda self, tokens: seen.append(numerics.tf32_flags())
                        or encode(self, tokens))
    numerics.set_tf32(True)
    classifier(["cat"])  # cached and reused by evaluation: computed in full fp32 even in a TF32 training run
    assert seen == [STRICT] and numerics.tf32_flags() == FAST


def test_the_predictor_and_main_set_the_policy(monkeypatch):
    numerics.set_tf32(True)
    Predictor(nn.Linear(1, 1), device="cpu", disk_cache=False)
    assert numerics.tf32_flags() == STRICT
    parser = cora_main.get_args_parser()
    assert parser.parse_args([]).allow_tf32 is False
    assert "Evaluation always runs without TF32" in " ".join(parser.format_help().split())

    class Stop(Exception):
        pass

    def stop(args):
        raise Stop

    monkeypatch.setattr(builtins, "print", builtins.print)
    monkeypatch.setattr(cora_main.ModelConfig, "from_args", stop)  # right after the policy is set
    for flag, expected in (([], STRICT), (["--allow_tf32"], FAST)):
        numerics.restore_tf32(numerics.TF32Flags(False, True, "highest"))
        with pytest.raises(Stop):
            cora_main.main(parser.parse_args(["--device", "cpu", *flag]))
        assert numerics.tf32_flags() == expected


# ---------------------------------------------------------------------------------------------- random states
class FakeCuda:
    """torch.cuda's random-state functions for `count` GPUs, the current one `current`."""

    def __init__(self, monkeypatch, count: int, current: int = 0):
        self.states = {i: torch.full((16,), i, dtype=torch.uint8) for i in range(count)}
        self.current = current
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.states[self._index(device)].clone())
        monkeypatch.setattr(torch.cuda, "set_rng_state", self._set)

        def refused(*args, **kwargs):
            raise AssertionError("every GPU's states: what breaks when the GPU count changes")

        monkeypatch.setattr(torch.cuda, "get_rng_state_all", refused)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", refused)

    def _index(self, device) -> int:
        if isinstance(device, int):
            return device
        device = torch.device(device)
        return self.current if device.index is None else device.index

    def _set(self, state, device="cuda"):
        index = self._index(device)
        if index >= len(self.states):
            raise IndexError(f"no GPU {index}")
        self.states[index] = state.clone()


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_random_states_round_trip_through_a_checkpoint(tmp_path):
    state = rng.checkpoint_rng_state()
    assert len(state["ranks"]) == 1 and ("cuda" in state) == torch.cuda.is_available()  # one process
    expected = _draws()
    save_checkpoint({"rng_state": state}, tmp_path / "c.pth")
    _draws()
    rng.set_rng_state(load_checkpoint(tmp_path / "c.pth")["rng_state"])  # weights_only-loadable
    assert _draws() == expected


def test_a_checkpoint_of_eight_gpus_resumes_on_one(monkeypatch, capsys):
    cuda = FakeCuda(monkeypatch, count=8)
    # saved by an 8-process run: every rank's state, each with its own GPU's generator
    ranks = []
    for r in range(8):
        cuda.current = r
        ranks.append(rng.rng_state())
        assert ranks[-1]["cuda_device"] == r and torch.equal(ranks[-1]["cuda"], torch.full((16,), r, dtype=torch.uint8))
    checkpoint = {**ranks[0], "ranks": ranks}
    # resumed by one process with one GPU
    one = FakeCuda(monkeypatch, count=1)
    one.states[0] = torch.zeros(16, dtype=torch.uint8) + 99
    rng.set_rng_state(checkpoint)
    assert torch.equal(one.states[0], ranks[0]["cuda"])
    # rank 3 of a new 4-process run takes rank 3's state, on its own (current) GPU
    four = FakeCuda(monkeypatch, count=4, current=3)
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    rng.set_rng_state(checkpoint)
    assert torch.equal(four.states[3], ranks[3]["cuda"])
    # rank 9 has no saved state: it keeps its own seed, with a note
    monkeypatch.setattr(dist, "get_rank", lambda: 9)
    before = random.getstate()
    rng.set_rng_state(checkpoint)
    assert random.getstate() == before and "keeps its own seed" in capsys.readouterr().out


def test_an_old_checkpoint_with_every_gpus_state_resumes_with_fewer_gpus(monkeypatch, capsys):
    old = {**rng.rng_state(), "cuda": [torch.full((16,), 10 + i, dtype=torch.uint8) for i in range(8)]}
    cuda = FakeCuda(monkeypatch, count=1)
    rng.set_rng_state(old)  # set_rng_state_all would raise IndexError with 1 GPU
    assert torch.equal(cuda.states[0], old["cuda"][0])
    cuda = FakeCuda(monkeypatch, count=4, current=3)
    rng.set_rng_state({**old, "cuda": old["cuda"][:2]})  # no entry for this GPU: skipped, said
    assert torch.equal(cuda.states[3], torch.full((16,), 3, dtype=torch.uint8))
    assert "none for cuda:3: not restored" in capsys.readouterr().out


def test_a_gpu_checkpoint_resumes_on_a_cpu(monkeypatch, capsys):
    FakeCuda(monkeypatch, count=2)
    state = rng.rng_state()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expected = _draws()
    rng.set_rng_state(state)
    assert _draws() == expected and "this machine has no CUDA" in capsys.readouterr().out


def test_checkpoint_states_hold_every_rank(monkeypatch):
    other = {**rng.rng_state(), "python": random.Random(5).getstate()}
    monkeypatch.setattr(dist, "all_gather", lambda obj: [obj, other])  # rank 0 of 2
    state = rng.checkpoint_rng_state()
    assert len(state["ranks"]) == 2 and state["python"] == state["ranks"][0]["python"]
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    rng.set_rng_state(state)
    assert random.random() == random.Random(5).random()


def _rng_rank_worker(rank: int, port: int, out_dir: str) -> None:
    """A rank of a real 2-process gloo run: save every rank's states, disturb them, resume from the file."""
    import json

    from util.run import seed_everything

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.init_distributed_mode(Namespace(device="cpu"))
    try:
        seed_everything(42 + rank)
        _draws()
        state = rng.checkpoint_rng_state()
        if rank == 0:
            save_checkpoint({"rng_state": state}, os.path.join(out_dir, "checkpoint.pth"))
        expected = _draws()
        dist.barrier()
        seed_everything(0)  # a new process of the resumed run
        rng.set_rng_state(load_checkpoint(os.path.join(out_dir, "checkpoint.pth"))["rng_state"])
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"expected": expected, "resumed": _draws()}, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_each_rank_resumes_its_own_random_streams(tmp_path, monkeypatch):
    import json
    import socket

    import torch.multiprocessing as mp

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rng_rank_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    out = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [o["resumed"] for o in out] == [o["expected"] for o in out]
    assert out[0]["expected"] != out[1]["expected"]  # each rank its own stream


# ---------------------------------------------------------------------------------------------- devices
def test_each_rank_uses_a_visible_gpu(monkeypatch):
    assert dist.cuda_index(3, 8) == 3 and dist.cuda_index(5, 1) == 0 and dist.cuda_index(9, 8) == 1
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        dist.cuda_index(0, 0)
    # a launcher that gives each of 4 tasks one GPU: local rank 3 sees only cuda:0
    chosen = []
    monkeypatch.setattr(builtins, "print", builtins.print)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kwargs: None)
    for name, value in dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="3", MASTER_ADDR="h", MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    args = Namespace(device="cuda")
    dist.init_distributed_mode(args)
    assert chosen == [0] and args.gpu == 3 and args.dist_backend == "nccl"
