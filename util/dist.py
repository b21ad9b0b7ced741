"""Distributed helpers: launch-mode detection, process-group setup, and the few collectives the
training and evaluation loops need (SPEC §1.3).

Launch modes, checked in this order (as the original's `init_distributed_mode`):

* **torchrun** — `RANK` and `WORLD_SIZE` are set (with `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`).
* **slurm** — `SLURM_PROCID` is set: rank = `SLURM_PROCID`, world size = `SLURM_NTASKS`,
  `MASTER_ADDR` = first host of `SLURM_NODELIST`, `MASTER_PORT` = `$MASTER_PORT` or a port derived
  from `SLURM_JOBID`. The original let rank 0 pick a free port and publish it through a file in the
  working directory that the other ranks polled; a port derived from the job id needs no shared
  file system and no polling, and every task of a job computes the same one.
* **none** — a single process, not distributed.

Nothing here assumes CUDA: the backend is NCCL only when the run's device is a CUDA device (gloo
otherwise), and tensors handed to collectives live on the device that backend expects.
"""

from __future__ import annotations

import builtins
import os
import re
import shutil
import subprocess
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# Ports derived from a slurm job id fall in [_PORT_BASE, _PORT_BASE + _PORT_SPAN): below Linux's
# default ephemeral range (32768-60999), so an outgoing connection rarely holds the port already.
_PORT_BASE = 10000
_PORT_SPAN = 20000


@dataclass(frozen=True)
class DistEnv:
    """What the environment says about this process's place in a distributed run."""

    mode: str  # 'torchrun' | 'slurm' | 'none'
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def distributed(self) -> bool:
        return self.mode != "none"


def _require_int(environ: Mapping[str, str], name: str, mode: str) -> int:
    if name not in environ:
        raise RuntimeError(f"{mode} launch detected but environment variable {name} is not set")
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name} must be an integer, found {value!r}") from None


def _split_top_level(text: str) -> list[str]:
    """Split at commas that are not inside `[...]` (slurm host lists nest ranges in brackets)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def parse_first_host(nodelist: str) -> str:
    """First host of a slurm node list without calling `scontrol`.

    Handles the usual compressed forms: `node7`, `a1,b2`, `node[03-05,9]`, `gpu-[1-2]-ib`,
    `rack[1-2]-node[01-04]` (each bracket group contributes its first entry, zero padding kept).
    """
    hosts = _split_top_level(nodelist.strip())
    if not hosts:
        raise ValueError(f"empty slurm node list: {nodelist!r}")
    first = hosts[0]

    def first_of_group(match: re.Match[str]) -> str:
        entry = match.group(1).split(",")[0]
        return entry.split("-")[0]

    host = re.sub(r"\[([^\]]*)\]", first_of_group, first)
    if "[" in host or "]" in host or not host:
        raise ValueError(f"cannot parse slurm node list {nodelist!r}")
    return host


def first_host(nodelist: str) -> str:
    """First host of a slurm node list: `scontrol show hostnames` when available (it knows every
    form slurm can produce), else `parse_first_host`."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            ).stdout.split()
        except (subprocess.SubprocessError, OSError):
            out = []
        if out:
            return out[0]
    return parse_first_host(nodelist)


def port_from_job_id(job_id: str) -> int:
    """A deterministic TCP port for a slurm job: the same on every task, different for nearby jobs."""
    key = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return _PORT_BASE + key % _PORT_SPAN


def detect_dist_env(
    environ: Mapping[str, str] | None = None,
    *,
    resolve_host: Callable[[str], str] = first_host,
    cuda_device_count: Callable[[], int] = torch.cuda.device_count,
) -> DistEnv:
    """Read the launch mode from `environ` (default `os.environ`); pure apart from `resolve_host`."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        master_port = env.get("MASTER_PORT")
        return DistEnv(
            mode="torchrun",
            rank=_require_int(env, "RANK", "torchrun"),
            world_size=_require_int(env, "WORLD_SIZE", "torchrun"),
            local_rank=_require_int(env, "LOCAL_RANK", "torchrun"),
            master_addr=env.get("MASTER_ADDR"),
            master_port=int(master_port) if master_port else None,
        )
    if "SLURM_PROCID" in env:
        rank = _require_int(env, "SLURM_PROCID", "slurm")
        world_size = _require_int(env, "SLURM_NTASKS", "slurm")
        for name in ("SLURM_NODELIST", "SLURM_JOBID"):
            if not env.get(name):
                raise RuntimeError(f"slurm launch detected but environment variable {name} is not set")
        # SLURM_LOCALID is the task's index on its node; the original used rank % GPUs per node,
        # which is the same for the usual one-task-per-GPU block layout.
        if "SLURM_LOCALID" in env:
            local_rank = _require_int(env, "SLURM_LOCALID", "slurm")
        else:
            local_rank = rank % max(cuda_device_count(), 1)
        port = env.get("MASTER_PORT")
        return DistEnv(
            mode="slurm",
            rank=rank,
            world_size=world_size,
            local_rank=local_rank,
            master_addr=resolve_host(env["SLURM_NODELIST"]),
            master_port=int(port) if port else port_from_job_id(env["SLURM_JOBID"]),
        )
    return DistEnv(mode="none")


def setup_for_distributed(is_master: bool) -> None:
    """Silence `print` on non-master ranks; `print(..., force=True)` prints anyway."""
    builtin_print = getattr(builtins.print, "_cora_builtin_print", builtins.print)

    def print(*args: Any, **kwargs: Any) -> None:  # noqa: A001 - replaces the builtin on purpose
        force = kwargs.pop("force", False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    print._cora_builtin_print = builtin_print  # type: ignore[attr-defined]  # lets a re-setup unwrap
    builtins.print = print


def _is_cuda(device: Any) -> bool:
    return torch.device(device).type == "cuda"


def cuda_index(local_rank: int, device_count: int | None = None) -> int:
    """The CUDA device of the process with `local_rank`: `local_rank % device_count` (default the visible
    GPUs). A launcher that gives each task its own GPU (slurm's `--gpus-per-task`, a per-rank
    `CUDA_VISIBLE_DEVICES`) leaves one visible device, cuda:0, while the local ranks go 0, 1, ...;
    with every GPU of the node visible it is the local rank itself."""
    count = torch.cuda.device_count() if device_count is None else device_count
    if count < 1:
        raise RuntimeError(f"local rank {local_rank}: a CUDA run, but no CUDA device is visible to this process")
    return local_rank % count


def init_distributed_mode(args: Any) -> DistEnv:
    """Set `args.distributed`, `args.rank`, `args.world_size`, `args.gpu` (local rank),
    `args.dist_url`, `args.dist_backend` from the environment, and join the process group.

    The backend follows `args.device` (NCCL for CUDA, gloo otherwise; an empty one means CUDA when
    available). Returns the detected `DistEnv`.
    """
    info = detect_dist_env()
    args.rank, args.world_size, args.gpu = info.rank, info.world_size, info.local_rank
    if not info.distributed:
        print("Not using distributed mode")
        args.distributed = False
        return info

    if info.mode == "slurm":
        # init_method='env://' reads these; under slurm nobody else sets them.
        os.environ.update(
            RANK=str(info.rank),
            WORLD_SIZE=str(info.world_size),
            LOCAL_RANK=str(info.local_rank),
            MASTER_ADDR=str(info.master_addr),
            MASTER_PORT=str(info.master_port),
        )
    args.distributed = True
    args.dist_url = "env://"
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if _is_cuda(device):
        torch.cuda.set_device(cuda_index(info.local_rank))
        args.dist_backend = "nccl"
    else:
        args.dist_backend = "gloo"
    print(f"| distributed init (rank {info.rank}): {args.dist_url} ({args.dist_backend})", flush=True)
    dist.init_process_group(
        backend=args.dist_backend, init_method=args.dist_url, world_size=info.world_size, rank=info.rank
    )
    barrier()
    setup_for_distributed(info.rank == 0)
    return info


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def collective_device() -> torch.device:
    """Where tensors given to collectives must live: the current CUDA device for NCCL, else CPU."""
    if is_dist_avail_and_initialized() and dist.get_backend() == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank; a no-op outside a process group."""
    if is_dist_avail_and_initialized():
        dist.barrier()


def all_gather(obj: Any) -> list[Any]:
    """`[obj of rank 0, obj of rank 1, ...]` for any picklable object; `[obj]` when not distributed."""
    world_size = get_world_size()
    if world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def reduce_dict(input_dict: Mapping[str, torch.Tensor], average: bool = True) -> dict[str, torch.Tensor]:
    """Sum (or average) scalar tensors over ranks; every rank gets the result.

    Keys are reduced in sorted order so that all ranks stack the values identically. The results
    come back on the device of the input values.
    """
    world_size = get_world_size()
    if world_size < 2 or not input_dict:
        return dict(input_dict)
    with torch.no_grad():
        names = sorted(input_dict.keys())
        out_device = torch.as_tensor(input_dict[names[0]]).device
        tensors = [torch.as_tensor(input_dict[k]).detach().reshape(()) for k in names]
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        if average and not dtype.is_floating_point:
            dtype = torch.get_default_dtype()
        values = torch.stack([t.to(device=collective_device(), dtype=dtype) for t in tensors])
        dist.all_reduce(values)
        if average:
            values /= world_size
        return {k: v.to(out_device) for k, v in zip(names, values, strict=True)}
