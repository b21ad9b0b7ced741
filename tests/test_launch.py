"""Launching as the original does: `configs/COCO/<config>.sh EXP NGPU local|slurm ...` (configs/controller.sh).

* local: torchrun with 2 CPU processes (gloo) trains and evaluates; evaluation gives the same detections and
  statistics with 2 processes as with 1; one training iteration on fixed inputs gives the same losses and
  weights with 2 processes as with 1 (tests/dist_loss_worker.py).
* slurm: scripts/submit_slurm.py through submitit's local executor (2 tasks), preempted by USR2 after the first
  epoch, requeued, resumed from checkpoint.pth; the sbatch file a slurm submission writes (fake `sbatch`);
  node / task arithmetic, quota type, the tasks' distributed environment; bad input.

Every run uses the tiny COCO-OVD files of tests/tiny_coco.py (4 training images here) and the golden miniature
CLIP. Processes run with one thread each (OMP_NUM_THREADS=1, what torchrun sets for several processes).
"""
import importlib.util
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import golden
from tests.conftest import HANG_GUARD_S, launch_environ
from tests.tiny_coco import TRAIN_JSON, TRAIN_RELABEL_JSON, make_tiny_coco
from util.checkpoint import load_checkpoint
from util.dist import detect_dist_env, parse_first_host, port_from_job_id

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/COCO/R50_dab_ovd_3enc_apm128_splcls0.2_relabel_noinit.sh"
WORK = "logs/COCO/R50_dab_ovd_3enc_apm128_splcls0.2_relabel_noinit"
TRAIN_IDS = (785, 139, 632, 285)  # 4 of the 6 tiny training images: 2 iterations per process of batch 1


def _load_submit_slurm():
    spec = importlib.util.spec_from_file_location("submit_slurm", ROOT / "scripts" / "submit_slurm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["submit_slurm"] = module
    spec.loader.exec_module(module)
    return module


submit_slurm = _load_submit_slurm()


def tiny_overrides():
    """Flags appended to the R50 config (or to main.py's) for the tiny data and model."""
    return ["--batch_size", "1", "--epochs", "1", "--model_path", golden.path("clip_tiny.pt"),
            "--region_prompt_path", golden.path("region_prompt_tiny.pth"), "--dim_feedforward", "64",
            "--num_queries", "30", "--enc_layers", "1", "--dec_layers", "2", "--text_dim", "64",
            "--model_ema_decay", "0.9", "--num_workers", "0", "--device", "cpu"]


def config_flags(coco, work_dir):
    """The R50 config's main.py flags, as the config's `args` block passes them."""
    text = (ROOT / CONFIG).read_text()
    block = re.search(r'args="(.*?)"', text, re.S).group(1).replace("\\\n", " ")
    return shlex.split(block.replace("$data_path", str(coco)).replace("$work_dir", str(work_dir)))


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    make_tiny_coco(root)
    for name in (TRAIN_JSON, TRAIN_RELABEL_JSON):
        path = root / "annotations" / name
        data = json.loads(path.read_text())
        data["images"] = [image for image in data["images"] if image["id"] in TRAIN_IDS]
        data["annotations"] = [ann for ann in data["annotations"] if ann["image_id"] in TRAIN_IDS]
        path.write_text(json.dumps(data))
    return root


def env_for(coco, **extra):
    return launch_environ(data_path=str(coco), OMP_NUM_THREADS="1", **extra)


def run_config(repo, coco, *argv, config=CONFIG, env=None, timeout=HANG_GUARD_S):
    proc = subprocess.run(["bash", config, *argv], cwd=repo, env=env or env_for(coco), capture_output=True,
                          text=True, timeout=timeout)
    tail = f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, f"{config} {argv} failed ({proc.returncode}):\n{tail}"
    return proc


def read_log(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "log.txt").read_text().splitlines()]


def console(output_dir):
    (path,) = Path(output_dir).glob("exp_*.txt")
    return path.read_text()


# ----------------------------------------------------------------------------------------------------------
# local: torchrun, 2 CPU processes


@pytest.mark.slow
def test_local_two_processes_train_and_eval_parity(repo, coco):
    import main as cora_main

    run_config(repo, coco, "t", "2", "local", *tiny_overrides())
    out = repo / WORK / "t"
    log = read_log(out)
    assert [entry["epoch"] for entry in log] == [0]
    assert math.isfinite(log[0]["train_loss"]) and math.isfinite(log[0]["test_loss"])
    assert len(log[0]["test_coco_eval_bbox"]) == 16
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 0
    text = console(out)
    # two gloo processes, each with half of the 4 training images: 2 iterations of batch 1 per process
    assert "| distributed init (rank 0): env:// (gloo)" in text and "| distributed init (rank 1): env:// (gloo)" in text
    assert re.findall(r"Epoch: \[0\]\s+\[\s*\d+/(\d+)\]", text) == ["2", "2"]
    info = json.loads(next(out.glob("run_*.json")).read_text())
    assert info["args"]["world_size"] == 2 and info["args"]["distributed"] is True

    # evaluation of the checkpoint (its EMA weights), 2 processes...
    checkpoint = str(out / "checkpoint.pth")
    run_config(repo, coco, "e2", "2", "local", *tiny_overrides(), "--eval", "--resume", checkpoint)
    two = repo / WORK / "e2"
    # ... and 1 process, here, with the same thread count as the processes above
    one = repo / "e1"
    argv = [*config_flags(coco, one), *tiny_overrides(), "--eval", "--resume", checkpoint]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stats = cora_main.main(cora_main.get_args_parser().parse_args(argv))
    finally:
        torch.set_num_threads(threads)

    # The 2-process evaluation gathered every image's detections exactly once: the same results file as 1
    # process, and the same accumulated arrays, from which the 16 statistics are computed.
    assert len(stats) == 16
    results_two = json.loads((two / "results_bbox.json").read_text())
    results_one = json.loads((one / "results_bbox.json").read_text())
    assert results_one and results_two == results_one
    state_two = torch.load(two / "eval.pth", weights_only=False)
    state_one = torch.load(one / "eval.pth", weights_only=False)
    assert state_two["imgIds"] == state_one["imgIds"] and len(state_one["imgIds"]) == 4
    for key in ("precision", "recall", "scores"):
        assert (state_two[key] == state_one[key]).all(), key
    # The evaluation inside the 2-process training equals the checkpoint's on every image: each rank's EMA is
    # copied after DDP broadcast rank 0's weights (the original copied before, from each rank's own seed + rank
    # initialisation, so rank 1's images were scored by another EMA than the one checkpoint.pth holds).
    in_training = json.loads((out / "results_bbox.json").read_text())
    assert in_training == results_one


@pytest.mark.slow
def test_two_processes_give_the_loss_and_update_of_one(tmp_path, coco):
    """`engine.train_one_epoch` under torchrun: 2 processes with one golden image each log the loss of 1 process
    with both, and take the same AdamW step (num_boxes averaged over ranks, DDP's gradient mean, reduced losses).

    Through the configs this cannot hold exactly: as in the original, every process draws its own augmentation
    (seed + rank) and dropout, so the worker feeds fixed inputs (tests/dist_loss_worker.py) with dropout 0."""
    results = {}
    for n in (1, 2):
        out = tmp_path / f"world{n}.pth"
        proc = subprocess.run(["torchrun", "--standalone", f"--nproc_per_node={n}", "tests/dist_loss_worker.py",
                               str(out)], cwd=ROOT, env=env_for(coco), capture_output=True, text=True,
                              timeout=HANG_GUARD_S)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results[n] = torch.load(out, weights_only=True)
        assert results[n]["world_size"] == n
    one, two = results[1]["stats"], results[2]["stats"]
    assert one.keys() == two.keys() and "loss_ce_1" in one
    for key in one:
        if key == "matched_gt_unscaled":  # a logged ratio the original takes per rank, then averages
            continue
        assert abs(one[key] - two[key]) <= 1e-5 * abs(one[key]) + 1e-7, (key, one[key], two[key])
    before = golden.load("checkpoint_tiny.pth")["model"]
    moved = 0
    for key, value in results[1]["weights"].items():
        torch.testing.assert_close(results[2]["weights"][key], value, rtol=0, atol=1e-6, msg=key)
        moved += int(not torch.equal(value, before[key]))
    assert moved > 0, "the step changed no weight"


# ----------------------------------------------------------------------------------------------------------
# slurm path through submitit's local executor


def _children(pid):
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _descendants(pid):
    children = _children(pid)
    return [pid for child in children for pid in (*_descendants(child), child)]


def _environ(pid):
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _wait_for(predicate, timeout, what, proc):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the submission ended before {what}:\n{proc.communicate()[0][-4000:]}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
                    reason="needs /proc/<pid>/task/<pid>/children to find the job's tasks")
@pytest.mark.slow
def test_submitit_local_preempted_job_requeues_and_resumes(coco, tmp_path):
    job_dir = tmp_path / "job"
    argv = [*config_flags(coco, job_dir), *tiny_overrides(), "--epochs", "2", "--eval_every_epoch", "100"]
    cmd = [sys.executable, str(ROOT / "scripts" / "submit_slurm.py"), "--local", "--wait", "--ngpus", "2",
           "--job_name", "t", "--job_dir", str(job_dir), "--", *argv]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env_for(coco), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        log_file = job_dir / "log.txt"
        _wait_for(lambda: log_file.exists() and log_file.read_text().count("\n") >= 1, HANG_GUARD_S, "epoch 0",
                  proc)
        # preempt: USR2 to task 0, as slurm signals before a preemption or the time limit
        tasks = [pid for controller in _children(proc.pid) for pid in _children(controller)]
        (rank0,) = [pid for pid in tasks if _environ(pid).get("SUBMITIT_LOCAL_GLOBALID") == "0"]
        os.kill(rank0, submitit_usr_sig())
        output, _ = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:  # a failed run: stop the submission, its controller and its tasks
            for pid in [*_descendants(proc.pid), proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.communicate()
    assert proc.returncode == 0, output[-4000:]
    job_id = re.search(r"submitted job (\d+): main\.py, 1 node\(s\) x 2 task\(s\), local executor", output).group(1)
    assert f"job {job_id} finished" in output
    assert f"log: {job_dir / 'submitit' / f'{job_id}_0_log.out'}" in output

    # epoch 0 ran once; the requeued job resumed from its checkpoint and ran epoch 1 only
    assert [entry["epoch"] for entry in read_log(job_dir)] == [0, 1]
    assert load_checkpoint(job_dir / "checkpoint.pth")["epoch"] == 1
    stdout = (job_dir / "submitit" / f"{job_id}_0_log.out").read_text()
    stderr = (job_dir / "submitit" / f"{job_id}_0_log.err").read_text()
    assert "Caught signal SIGUSR2" in stderr and "this job is preempted" in stderr
    assert f"requeued job (attempt 1): resuming from {job_dir / 'checkpoint.pth'}" in stdout
    assert stdout.count("| distributed init (rank 0): env:// (gloo)") == 2
    assert len(re.findall(r"Epoch: \[0\] Total time", stdout)) == 1
    assert len(re.findall(r"Epoch: \[1\] Total time", stdout)) == 1
    assert "requeued job (attempt 1)" in (job_dir / "submitit" / f"{job_id}_1_log.out").read_text()


def submitit_usr_sig():
    import submitit

    return submitit.JobEnvironment._usr_sig()


# ----------------------------------------------------------------------------------------------------------
# slurm submission without slurm: fake srun / sbatch on PATH


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """`srun` (submitit looks for it) and an `sbatch` that keeps the script it is given and answers job 4242."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = tmp_path / "sbatch_script.sh"
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {shlex.quote(str(script))}\necho "Submitted batch job 4242"\n')
    for name in ("srun", "sbatch"):
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return script


def sbatch_options(script):
    return dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", script.read_text(), re.M))


def submitted_job(job_dir, job_id="4242"):
    from submitit.core.utils import DelayedSubmission

    return DelayedSubmission.load(Path(job_dir) / "submitit" / f"{job_id}_submitted.pkl").function


def test_slurm_submission_script(coco, tmp_path, fake_slurm, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    job_dir = tmp_path / "job"
    entry_args = [*config_flags(coco, job_dir), *tiny_overrides()]
    status = submit_slurm.main(["--ngpus", "16", "--partition", "gpu", "--quotatype", "spot", "--job_name", "RN50",
                                "--job_dir", str(job_dir), "--comment", "cora run", "--", *entry_args])
    assert status == 0
    out = capsys.readouterr().out
    assert "submitted job 4242: main.py, 2 node(s) x 8 task(s), partition gpu, quotatype spot" in out
    assert f"log: {job_dir / 'submitit' / '4242_0_log.out'}" in out
    options = sbatch_options(fake_slurm)
    expected = {"nodes": "2", "ntasks-per-node": "8", "gpus-per-node": "8", "cpus-per-task": "8", "partition": "gpu",
                "quotatype": "spot", "time": "4320", "job-name": "RN50", "signal": "USR2@120",
                "comment": "'cora run'"}
    assert {k: options.get(k) for k in expected} == expected
    assert "srun --unbuffered" in fake_slurm.read_text()
    job = submitted_job(job_dir)
    assert (job.entry, job.argv, job.workdir, job.attempt) == ("main.py", entry_args, str(ROOT), 0)
    # on preemption submitit dumps the job's checkpoint(): the same command, next attempt
    again = job.checkpoint().function
    assert (again.entry, again.argv, again.workdir, again.attempt) == ("main.py", entry_args, str(ROOT), 1)

    # quota type 'auto': nothing added; a single node; extra sbatch options pass through
    submit_slurm.main(["--ngpus", "4", "--quotatype", "auto", "--slurm_param", "account=abc", "--mem_gb", "64",
                       "--job_dir", str(tmp_path / "job2"), "--", *entry_args])
    options = sbatch_options(fake_slurm)
    assert "quotatype" not in options and "partition" not in options
    assert (options["nodes"], options["ntasks-per-node"], options["gpus-per-node"]) == ("1", "4", "4")
    assert options["account"] == "abc" and options["mem"] == "64GB"


@pytest.mark.slow
def test_config_slurm_mode_passes_entry_quota_and_partition(repo, coco, fake_slurm):
    # region prompting's config sets entry=tools/region_prompt.py: the slurm header must submit that script
    proc = run_config(repo, coco, "rp", "16", "slurm", "reserved", "part1", "--model_path", "x.pt",
                      config="configs/COCO/region_prompt_R50.sh")
    work = repo / "logs/COCO/region_prompt_R50/rp"
    assert "submitted job 4242: tools/region_prompt.py, 2 node(s) x 8 task(s), partition part1, quotatype reserved" \
        in proc.stdout
    assert "submitted job 4242" in console(work)
    options = sbatch_options(fake_slurm)
    assert (options["partition"], options["quotatype"], options["nodes"], options["job-name"]) == \
        ("part1", "reserved", "2", "rp")
    job = submitted_job(work)
    assert job.entry == "tools/region_prompt.py" and job.workdir == str(repo)
    assert job.argv[-2:] == ["--model_path", "x.pt"]
    assert job.argv[job.argv.index("--output_dir") + 1] == "logs/COCO/region_prompt_R50/rp"


# ----------------------------------------------------------------------------------------------------------
# units: node / task arithmetic, executor parameters, the tasks' distributed environment


@pytest.mark.parametrize("ngpus, per_node, nodes, expected", [
    (1, 8, None, (1, 1)), (8, 8, None, (1, 8)), (4, 8, None, (1, 4)), (16, 8, None, (2, 8)),
    (12, 8, None, (2, 6)), (32, 8, None, (4, 8)), (16, 4, None, (4, 4)), (16, 8, 4, (4, 4)), (8, 8, 2, (2, 4)),
])
def test_plan_tasks(ngpus, per_node, nodes, expected):
    assert submit_slurm.plan_tasks(ngpus, per_node, nodes) == expected


@pytest.mark.parametrize("ngpus, per_node, nodes, flag, words", [
    (9, 8, None, "--ngpus", "--ngpus 9 cannot be split evenly over 2 nodes"),
    (0, 8, None, "--ngpus", "at least 1"),
    (16, 8, 1, "--nodes", "16 GPUs each, more than --gpus_per_node 8"),
    (6, 8, 4, "--nodes", "--ngpus 6 cannot be split evenly over 4 nodes"),
    (8, 0, None, "--gpus_per_node", "at least 1"),
])
def test_plan_tasks_errors(ngpus, per_node, nodes, flag, words):
    with pytest.raises(submit_slurm.LaunchError) as info:
        submit_slurm.plan_tasks(ngpus, per_node, nodes)
    assert info.value.flag == flag and words in str(info.value)


def _args(*argv):
    return submit_slurm.get_args_parser().parse_args(list(argv))


def test_executor_parameters():
    params = submit_slurm.executor_parameters(_args("--ngpus", "24", "--partition", "p", "--quotatype", "spot",
                                                    "--job_name", "x", "--comment", "c"))
    assert params == {"name": "x", "nodes": 3, "tasks_per_node": 8, "gpus_per_node": 8, "cpus_per_task": 8,
                      "timeout_min": 4320, "slurm_signal_delay_s": 120, "slurm_partition": "p",
                      "slurm_comment": "c", "slurm_additional_parameters": {"quotatype": "spot"}}
    assert "slurm_additional_parameters" not in submit_slurm.executor_parameters(_args("--ngpus", "8"))
    # the local executor: one node; GPUs only when the machine has enough, else CPU processes
    assert submit_slurm.executor_parameters(_args("--ngpus", "2", "--local"), local_gpus=0)["gpus_per_node"] == 0
    assert submit_slurm.executor_parameters(_args("--ngpus", "2", "--local"), local_gpus=2)["gpus_per_node"] == 2
    with pytest.raises(submit_slurm.LaunchError, match="--local runs on this machine only"):
        submit_slurm.executor_parameters(_args("--ngpus", "16", "--local"), local_gpus=16)


def test_task_environment_slurm(monkeypatch):
    import submitit

    # what srun gives task 11 of a 2 x 8 job; a stale torchrun variable from the submitting shell is dropped
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "731", "SLURM_JOBID": "731", "SLURM_PROCID": "11",
             "SLURM_NTASKS": "16", "SLURM_LOCALID": "3", "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2",
             "SLURM_NODELIST": "gpu[07-08]", "SLURM_JOB_NODELIST": "gpu[07-08]", "RANK": "0", "WORLD_SIZE": "1"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    job_env = submitit.JobEnvironment()
    assert (job_env.cluster, job_env.global_rank, job_env.local_rank, job_env.num_tasks) == ("slurm", 11, 3, 16)
    environ = dict(os.environ)
    submit_slurm.prepare_dist_env(environ, job_env)
    info = detect_dist_env(environ, resolve_host=parse_first_host)
    assert (info.mode, info.rank, info.world_size, info.local_rank) == ("slurm", 11, 16, 3)
    assert (info.master_addr, info.master_port) == ("gpu07", port_from_job_id("731"))


def test_task_environment_local(monkeypatch):
    import submitit

    local = {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "5150", "SUBMITIT_LOCAL_NTASKS": "2",
             "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_NODEID": "0",
             "SUBMITIT_LOCAL_JOB_NUM_NODES": "1"}
    for name, value in local.items():
        monkeypatch.setenv(name, value)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    environ = dict(os.environ)
    submit_slurm.prepare_dist_env(environ, submitit.JobEnvironment())
    info = detect_dist_env(environ)
    assert (info.mode, info.rank, info.world_size, info.local_rank) == ("torchrun", 1, 2, 1)
    assert (info.master_addr, info.master_port) == ("127.0.0.1", port_from_job_id("5150"))


def test_load_entry():
    assert submit_slurm.load_entry("main.py").__name__ == "main"
    assert submit_slurm.load_entry(ROOT / "tools" / "region_prompt.py").__name__ == "tools.region_prompt"


# ----------------------------------------------------------------------------------------------------------
# bad input: exit status 2, the message names the argument


def test_cli_missing_separator():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "submit_slurm.py"), "--ngpus", "8"],
                          capture_output=True, text=True, cwd=ROOT, timeout=HANG_GUARD_S)
    assert proc.returncode == 2
    assert "error: --: missing: write `--` between" in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["--ngpus", "9", "--"], "error: --ngpus: --ngpus 9 cannot be split evenly over 2 nodes"),
    (["--ngpus", "8", "--nodes", "3", "--"], "error: --nodes: --ngpus 8 cannot be split evenly over 3 nodes"),
    (["--ngpus", "2", "--entry", "no_such_entry.py", "--"], "error: --entry: no such file: no_such_entry.py"),
    (["--ngpus", "2", "--entry", "README.md", "--"], "error: --entry: not a Python file"),
    (["--ngpus", "2", "--slurm_param", "account", "--"], "error: --slurm_param: expected KEY=VALUE"),
    (["--ngpus", "2", "--timeout", "0", "--"], "error: --timeout: must be at least 1 minute"),
    (["--ngpus", "two", "--"], "argument --ngpus: invalid int value: 'two'"),
    (["--partition", "p", "--"], "the following arguments are required: --ngpus"),
])
def test_cli_bad_input(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as info:
        submit_slurm.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_bad_entry_arguments(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as info:
        submit_slurm.main(["--ngpus", "2", "--local", "--job_dir", str(tmp_path), "--", "--no_such_flag"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --no_such_flag" in err and "not valid for main.py" in err
    assert not (tmp_path / "submitit").exists()  # nothing submitted


def test_cli_without_slurm_says_so(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    with pytest.raises(SystemExit) as info:
        submit_slurm.main(["--ngpus", "2", "--job_dir", str(tmp_path), "--", "--epochs", "1"])
    assert info.value.code == 2
    assert 'error: --local: Could not detect "srun"' in capsys.readouterr().err
