# Sourced by every config after it sets `name=$0`. Positional interface of the original:
#   bash configs/<...>.sh EXP NGPU local [extra main.py args]
#   bash configs/<...>.sh EXP NGPU slurm QUOTA_TYPE PARTITION [extra main.py args]
# Work dir: the config's path with configs/ -> logs/ and .sh -> /EXP; the console log of every run
# is appended to <work_dir>/exp_<timestamp>.txt.
# A config may set `entry=<script>` before sourcing this file (default main.py), for both launch modes.
# The config's exit status is the launcher's (pipefail: not that of the `tee` into the console log).
set -o pipefail
exp=${1:-test}
gpu=${2:-8}
type=${3:-local}
if [ "$type" = "local" ]; then
    extra_args=" ${*:4:99}"
else
    quotatype=${4:-auto}
    partition=${5:-1}
    extra_args=" ${*:6:99}"
fi

work_dir=${name/#configs/logs}
work_dir=${work_dir//.sh//$exp}
mkdir -p "$work_dir"
now=$(date +%Y%m%d_%H%M%S)
data_path=${data_path:-data/coco}
lvis_path=${lvis_path:-data/lvis}  # the LVIS configs' --lvis_path (lvis_v1_*.json, train2017/, val2017/)
# so that the package's modules resolve when configs are run from the repository root
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"

if [ "$type" = "local" ]; then
    # torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without a GPU main.py uses the gloo backend on CPU.
    header="torchrun --standalone --nproc_per_node=$gpu ${entry:-main.py} "
else
    # submitit (scripts/submit_slurm.py): NGPU tasks, one per GPU (several nodes when NGPU exceeds its
    # --gpus_per_node, default 8), requeued on preemption / timeout and resumed from checkpoint.pth.
    # QUOTA_TYPE 'auto' adds no --quotatype to the job (standard slurm).
    header="python scripts/submit_slurm.py --entry ${entry:-main.py} --ngpus $gpu --partition $partition --quotatype $quotatype --job_name $exp --job_dir $work_dir -- "
fi
