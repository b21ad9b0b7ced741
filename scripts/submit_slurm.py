"""Submit a training / evaluation entry script (main.py, tools/region_prompt.py) to slurm with submitit.

What the configs' `slurm` mode runs (configs/controller.sh):

    bash configs/COCO/R50_dab_ovd_3enc_apm128_splcls0.2_relabel_noinit.sh RN50 16 slurm spot my_partition
    # -> python scripts/submit_slurm.py --entry main.py --ngpus 16 --partition my_partition --quotatype spot \
    #        --job_name RN50 --job_dir logs/COCO/<config>/RN50 -- <the config's main.py flags>

Directly:

    python scripts/submit_slurm.py --ngpus 8 --partition p -- --coco_path data/coco --output_dir logs/run ...
    python scripts/submit_slurm.py --entry tools/region_prompt.py --ngpus 8 --partition p -- --output_dir ...
    python scripts/submit_slurm.py --local --wait --ngpus 2 -- <flags>   # submitit's local executor, no slurm

Everything after `--` goes to the entry script, whose own parser checks it before anything is submitted.

One slurm task per GPU: `--ngpus N` asks for ceil(N / --gpus_per_node) nodes (or `--nodes`) with
N / nodes tasks and GPUs on each (N must divide evenly). Each task imports the entry and calls its
`main(get_args_parser().parse_args(<flags>))` in-process; util/dist.py reads the task's place from
SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_NODELIST / SLURM_JOBID (the master port is
derived from the job id, so a requeued job finds the same one). Under `--local` the same variables
come from submitit's local environment (as RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT, what torchrun would set).

Preemption and timeout: slurm sends USR2 `--signal_delay_s` seconds before the end; submitit calls
the job's `checkpoint()`, which resubmits the same command, and requeues the job. The requeued job
resumes from `<output_dir>/checkpoint.pth` (written every epoch) and continues with the next epoch.

Submission prints the job id and the paths of the logs of task 0
(`<job_dir>/submitit/<job id>_0_log.out` / `.err`); the entry's own outputs go to its `--output_dir`.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import submitit

REPO_ROOT = Path(__file__).resolve().parents[1]

# Variables torchrun sets; util/dist.py prefers them to SLURM_*, so stale ones must not reach a slurm task.
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class LaunchError(ValueError):
    """Bad input; `flag` names the argument at fault."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "submit_slurm.py",
        usage="python scripts/submit_slurm.py [options] -- <entry script arguments>",
        description="Submit an entry script (default main.py) to slurm through submitit: one task per GPU, "
                    "requeued on preemption or timeout, resuming from <output_dir>/checkpoint.pth.",
    )
    p.add_argument("--entry", default="main.py",
                   help="script whose get_args_parser() and main(args) run in every task (default main.py; "
                        "tools/region_prompt.py for region prompting); relative to the current directory")
    p.add_argument("--ngpus", type=int, required=True, help="total number of GPUs = slurm tasks (processes)")
    p.add_argument("--gpus_per_node", type=int, default=8,
                   help="GPUs of one node (default 8); more GPUs than this span several nodes")
    p.add_argument("--nodes", type=int, default=None,
                   help="number of nodes (default ceil(ngpus / gpus_per_node)); ngpus must divide by it")
    p.add_argument("--partition", default="", help="slurm partition (empty: the cluster's default)")
    p.add_argument("--quotatype", default="auto",
                   help="quota type of clusters with slurm's quotatype extension (the original launched with "
                        "`srun --quotatype=...`): e.g. reserved or spot, added to the job as "
                        "`#SBATCH --quotatype=<value>`; 'auto' (default) adds nothing, for standard slurm")
    p.add_argument("--timeout", type=int, default=4320, help="time limit of one job run in minutes (default 4320)")
    p.add_argument("--cpus_per_task", type=int, default=8, help="CPUs per task (per GPU), default 8")
    p.add_argument("--mem_gb", type=float, default=None, help="memory per node in GB (default: the cluster's)")
    p.add_argument("--comment", default="", help="slurm job comment")
    p.add_argument("--slurm_param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --slurm_param account=abc (repeatable)")
    p.add_argument("--signal_delay_s", type=int, default=120,
                   help="seconds between the preemption / timeout signal (USR2) and the kill (default 120)")
    p.add_argument("--max_num_timeout", type=int, default=30,
                   help="how many times a job that reaches its time limit is requeued (default 30; "
                        "preemptions do not count)")
    p.add_argument("--job_name", default="cora", help="slurm job name")
    p.add_argument("--job_dir", default="logs/slurm",
                   help="submitit's pickles and the task logs go to <job_dir>/submitit/")
    p.add_argument("--local", action="store_true",
                   help="run with submitit's local executor on this machine (one node; GPUs are used when the "
                        "machine has --ngpus of them, else the processes run on CPU): a test of the slurm path")
    p.add_argument("--wait", action="store_true",
                   help="wait for the job to end; exit status 1 when it failed (and print task 0's error log)")
    return p


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """`[own options] -- [entry arguments]` -> (own, entry). The `--` is required."""
    argv = list(argv)
    if "--" not in argv:
        raise LaunchError("--", "missing: write `--` between this script's options and the entry's arguments "
                                "(python scripts/submit_slurm.py --ngpus 8 ... -- --coco_path ...)")
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def plan_tasks(ngpus: int, gpus_per_node: int, nodes: int | None = None) -> tuple[int, int]:
    """(nodes, tasks per node) for one task per GPU."""
    if ngpus < 1:
        raise LaunchError("--ngpus", f"must be at least 1, got {ngpus}")
    if gpus_per_node < 1:
        raise LaunchError("--gpus_per_node", f"must be at least 1, got {gpus_per_node}")
    if nodes is None:
        nodes = math.ceil(ngpus / gpus_per_node)
        flag = "--ngpus"
    else:
        if nodes < 1:
            raise LaunchError("--nodes", f"must be at least 1, got {nodes}")
        flag = "--nodes"
    if ngpus % nodes:
        raise LaunchError(flag, f"--ngpus {ngpus} cannot be split evenly over {nodes} nodes "
                                f"(--gpus_per_node {gpus_per_node}); choose a multiple of {nodes}")
    per_node = ngpus // nodes
    if per_node > gpus_per_node:
        raise LaunchError("--nodes", f"{nodes} nodes would need {per_node} GPUs each, more than "
                                     f"--gpus_per_node {gpus_per_node}")
    return nodes, per_node


def parse_slurm_params(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise LaunchError("--slurm_param", f"expected KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def executor_parameters(args: argparse.Namespace, *, local_gpus: int | None = None) -> dict[str, Any]:
    """Keyword arguments for `submitit.AutoExecutor.update_parameters`.

    `local_gpus`: GPUs of this machine (only for `--local`; None means slurm).
    """
    nodes, per_node = plan_tasks(args.ngpus, args.gpus_per_node, args.nodes)
    if args.timeout < 1:
        raise LaunchError("--timeout", f"must be at least 1 minute, got {args.timeout}")
    if args.cpus_per_task < 1:
        raise LaunchError("--cpus_per_task", f"must be at least 1, got {args.cpus_per_task}")
    gpus = per_node
    if local_gpus is not None:
        if nodes != 1:
            raise LaunchError("--ngpus", f"--local runs on this machine only, but --ngpus {args.ngpus} needs "
                                         f"{nodes} nodes of --gpus_per_node {args.gpus_per_node}")
        gpus = per_node if local_gpus >= per_node else 0  # 0: CUDA_VISIBLE_DEVICES='', CPU processes
    params: dict[str, Any] = {
        "name": args.job_name,
        "nodes": nodes,
        "tasks_per_node": per_node,
        "gpus_per_node": gpus,
        "cpus_per_task": args.cpus_per_task,
        "timeout_min": args.timeout,
        "slurm_signal_delay_s": args.signal_delay_s,
    }
    if args.partition:
        params["slurm_partition"] = args.partition
    if args.mem_gb is not None:
        params["mem_gb"] = args.mem_gb
    if args.comment:
        params["slurm_comment"] = args.comment
    additional: dict[str, str] = {}
    if args.quotatype and args.quotatype != "auto":
        additional["quotatype"] = args.quotatype
    additional.update(parse_slurm_params(args.slurm_param))
    if additional:
        params["slurm_additional_parameters"] = additional
    return params


def load_entry(entry: str | os.PathLike):
    """Import an entry script as a module (main.py -> `main`, tools/region_prompt.py -> `tools.region_prompt`),
    with the directory above its packages on sys.path, as `python <entry>` would resolve its imports."""
    path = Path(entry).resolve()
    if not path.is_file():
        raise LaunchError("--entry", f"no such file: {entry}")
    if path.suffix != ".py":
        raise LaunchError("--entry", f"not a Python file: {entry}")
    root = path.parent
    while (root / "__init__.py").exists():
        root = root.parent
    dotted = ".".join(path.relative_to(root).with_suffix("").parts)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    module = importlib.import_module(dotted)
    if Path(getattr(module, "__file__", "") or "").resolve() != path:
        raise LaunchError("--entry", f"{entry}: importing {dotted!r} found {module.__file__} instead")
    for name in ("get_args_parser", "main"):
        if not callable(getattr(module, name, None)):
            raise LaunchError("--entry", f"{entry} has no function {name}()")
    return module


def prepare_dist_env(environ: MutableMapping[str, str], job_env: Any) -> None:
    """Set up `environ` so that util/dist.py finds this task's place in the job.

    Under slurm, srun gives every task SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_NODELIST /
    SLURM_JOBID, which util/dist.py reads (master = first node, port from the job id); torchrun's
    variables, which it would prefer, are removed in case the submitting shell had them. Submitit's
    local executor sets its own variables only: they are translated into torchrun's.
    """
    if job_env.cluster == "slurm":
        for name in _TORCHRUN_VARS:
            environ.pop(name, None)
        return
    from util.dist import port_from_job_id

    environ.update(
        RANK=str(job_env.global_rank),
        WORLD_SIZE=str(job_env.num_tasks),
        LOCAL_RANK=str(job_env.local_rank),
        MASTER_ADDR=environ.get("MASTER_ADDR") or "127.0.0.1",
        MASTER_PORT=environ.get("MASTER_PORT") or str(port_from_job_id(str(job_env.job_id))),
    )


class EntryJob(submitit.helpers.Checkpointable):
    """What every task of the job runs: `<entry>.main(<entry>.get_args_parser().parse_args(argv))`.

    `checkpoint()` (called by submitit on preemption or timeout, on task 0) resubmits the same command
    as attempt `attempt + 1`; a requeued attempt resumes from `<output_dir>/checkpoint.pth` when it
    exists, even when the command names another `--resume` (e.g. weights to start from).
    """

    def __init__(self, entry: str, argv: Sequence[str], workdir: str, attempt: int = 0):
        self.entry = str(entry)
        self.argv = list(argv)
        self.workdir = str(workdir)
        self.attempt = attempt

    def __call__(self) -> Any:
        os.chdir(self.workdir)
        if str(REPO_ROOT) not in sys.path:
            sys.path.insert(0, str(REPO_ROOT))
        prepare_dist_env(os.environ, submitit.JobEnvironment())
        module = load_entry(self.entry)
        args = module.get_args_parser().parse_args(self.argv)
        if self.attempt > 0 and not getattr(args, "eval", False) and getattr(args, "output_dir", ""):
            checkpoint = Path(args.output_dir) / "checkpoint.pth"
            if checkpoint.is_file():
                args.resume = str(checkpoint)
                print(f"requeued job (attempt {self.attempt}): resuming from {checkpoint}", flush=True)
        return module.main(args)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(EntryJob(self.entry, self.argv, self.workdir, self.attempt + 1))


def make_executor(args: argparse.Namespace, params: Mapping[str, Any]) -> submitit.AutoExecutor:
    folder = Path(args.job_dir) / "submitit"
    if args.local:
        executor = submitit.AutoExecutor(folder=folder, cluster="local")
    else:
        try:
            executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                             slurm_max_num_timeout=args.max_num_timeout)
        except RuntimeError as error:  # no srun on this machine
            raise LaunchError("--local", f"{error} (use --local to run the job on this machine)") from None
    executor.update_parameters(**params)
    return executor


def submit(args: argparse.Namespace, entry_argv: Sequence[str]) -> submitit.Job:
    """Check the entry's arguments with its own parser, then submit one EntryJob."""
    module = load_entry(args.entry)
    try:
        module.get_args_parser().parse_args(list(entry_argv))
    except SystemExit as exit_:  # the entry's parser printed its message
        if exit_.code:
            print(f"submit_slurm.py: the arguments after `--` are not valid for {args.entry} (see above); "
                  "nothing submitted", file=sys.stderr, flush=True)
        raise
    local_gpus = None
    if args.local:
        import torch

        local_gpus = torch.cuda.device_count()
    params = executor_parameters(args, local_gpus=local_gpus)
    executor = make_executor(args, params)
    if __name__ != "__main__":  # imported: the job cannot import this module by name, send it by value
        import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return executor.submit(EntryJob(args.entry, entry_argv, os.getcwd()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = get_args_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv[: argv.index("--") if "--" in argv else len(argv)]):
        parser.print_help()
        return 0
    try:
        own, entry_argv = split_argv(argv)
        args = parser.parse_args(own)
        executor_parameters(args, local_gpus=0 if args.local else None)  # bad numbers fail before any import
        job = submit(args, entry_argv)
    except LaunchError as error:
        parser.error(str(error))  # exit status 2
    nodes, per_node = plan_tasks(args.ngpus, args.gpus_per_node, args.nodes)
    where = "local executor" if args.local else f"partition {args.partition or '(default)'}, quotatype {args.quotatype}"
    print(f"submitted job {job.job_id}: {args.entry}, {nodes} node(s) x {per_node} task(s), {where}", flush=True)
    print(f"  log: {job.paths.stdout}", flush=True)
    print(f"  err: {job.paths.stderr}", flush=True)
    if not args.wait:
        return 0
    try:
        job.results()
    except Exception as error:  # any failure of the job (an exception in a task, a killed task)
        print(f"job {job.job_id} failed: {error}", file=sys.stderr, flush=True)
        return 1
    print(f"job {job.job_id} finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
