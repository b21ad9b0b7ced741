#!/usr/bin/env bash
# Full COCO-OVD reproduction from COCO images, the base training json and a CLIP archive:
#
#   stage 1  region prompting        configs/COCO/region_prompt_<R50|R50x4>.sh
#            -> logs/region_prompt_<R50|R50x4>.pth
#   stage 2  CLIP-aligned labelling  tools/relabel.py (export on every GPU, then merge)
#            -> $data_path/annotations/instances_train2017_base_RN50relabel.json       (R50)
#               $data_path/annotations/instances_train2017_base_RN50x4relabel_pre.json (R50x4)
#   stage 3  the localizer           configs/COCO/<R50|R50x4>_dab_ovd_3enc_apm128_splcls0.2_relabel_noinit.sh
#            -> logs/COCO/<config>/<EXP>/checkpoint.pth of its last epoch
#
# Each stage is skipped when its output exists (stage 3: when the run's log.txt records its last
# epoch, which main.py appends after writing checkpoint.pth). An interrupted stage 1 or 3 resumes from its own checkpoint.pth; stage 2 starts again.
#
# Usage, from the repository root:
#   export data_path=/path/to/coco     # train2017/ val2017/ annotations/instances_train2017_base.json,
#                                      # annotations/instances_val2017_basetarget.json
#   bash tools/reproduce_coco.sh R50 8 [EXP]        # or R50x4; NGPU processes per stage (torchrun)
# EXP names the runs' work dirs (default RN50 / RN50x4). Optional environment:
#   CLIP_PATH=/path/to/RN50.pt         --model_path for all three stages (default ~/.cache/clip/<name>.pt)
#   PROMPT_ARGS, RELABEL_ARGS, LOCALIZER_ARGS
#                                      extra flags appended to one stage (later flags win)
set -euo pipefail

variant=${1:-R50}
ngpu=${2:-8}
case "$variant" in
    R50) backbone=clip_RN50; relabelled=instances_train2017_base_RN50relabel.json ;;
    R50x4) backbone=clip_RN50x4; relabelled=instances_train2017_base_RN50x4relabel_pre.json ;;
    *) echo "usage: bash tools/reproduce_coco.sh R50|R50x4 NGPU [EXP] (got variant '$variant')" >&2; exit 2 ;;
esac
exp=${3:-${backbone#clip_}}
export data_path=${data_path:-data/coco}

prompt_config=configs/COCO/region_prompt_${variant}.sh
localizer_config=configs/COCO/${variant}_dab_ovd_3enc_apm128_splcls0.2_relabel_noinit.sh
for f in "$prompt_config" "$localizer_config" tools/relabel.py; do
    if [ ! -f "$f" ]; then
        echo "tools/reproduce_coco.sh: $f not found; run this from the repository root" >&2
        exit 2
    fi
done
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
model_flag=${CLIP_PATH:+--model_path $CLIP_PATH}

prompt_file=logs/region_prompt_${variant}.pth
relabelled_json=$data_path/annotations/$relabelled
localizer_dir=logs/COCO/$(basename "$localizer_config" .sh)/$exp
relabel_dir=logs/relabel_${backbone#clip_}

# A failed stage stops the pipeline with the log to read (the configs keep the launcher's exit status
# through their `tee`); a stage that exits 0 must also have written its output.
fail() {  # fail MESSAGE LOG
    echo "tools/reproduce_coco.sh: $1; see $2" >&2
    exit 1
}

require() {  # require FILE STAGE LOG
    [ -f "$1" ] || fail "$2 did not produce $1" "$3"
}

localizer_done() {  # the run's log.txt records its last epoch (main.py appends it after checkpoint.pth)
    [ -f "$localizer_dir/checkpoint.pth" ] && [ -f "$localizer_dir/log.txt" ] || return 1
    # plain json, no torch import: the epoch count of the newest run_<timestamp>.json main.py wrote there
    python - "$localizer_dir" <<'EOF'
import glob, json, os, sys
folder = sys.argv[1]
runs = sorted(glob.glob(os.path.join(folder, "run_*.json")))
records = [json.loads(line) for line in open(os.path.join(folder, "log.txt")).read().splitlines() if line.strip()]
logged = [r["epoch"] for r in records if "epoch" in r]  # --eval runs write lines without one
if not runs or not logged:
    sys.exit(1)
epochs = json.load(open(runs[-1]))["args"]["epochs"]
sys.exit(0 if max(logged) + 1 >= epochs else 1)
EOF
}

echo "== stage 1/3: region prompting -> $prompt_file"
if [ -f "$prompt_file" ]; then
    echo "   exists, skipped"
else
    # shellcheck disable=SC2086  # the flag strings are word-split on purpose
    bash "$prompt_config" "$exp" "$ngpu" local $model_flag ${PROMPT_ARGS:-} \
        || fail "stage 1 (region prompting) failed" "logs/COCO/region_prompt_${variant}/$exp/exp_*.txt"
    require "$prompt_file" "stage 1 (region prompting)" "logs/COCO/region_prompt_${variant}/$exp/exp_*.txt"
fi

echo "== stage 2/3: CLIP-aligned labelling -> $relabelled_json"
if [ -f "$relabelled_json" ]; then
    echo "   exists, skipped"
else
    mkdir -p "$relabel_dir"
    # shellcheck disable=SC2086
    torchrun --standalone --nproc_per_node="$ngpu" tools/relabel.py --coco_path "$data_path" \
        --backbone "$backbone" --region_prompt_path "$prompt_file" --relabel_folder "$relabel_dir" \
        --target_name "$relabelled_json" $model_flag ${RELABEL_ARGS:-} \
        2>&1 | tee -a "$relabel_dir/exp_$(date +%Y%m%d_%H%M%S).txt" \
        || fail "stage 2 (relabelling) failed" "$relabel_dir/exp_*.txt"
    require "$relabelled_json" "stage 2 (relabelling)" "$relabel_dir/exp_*.txt"
fi

echo "== stage 3/3: localizer -> $localizer_dir"
if localizer_done; then
    echo "   finished, skipped"
else
    # shellcheck disable=SC2086
    bash "$localizer_config" "$exp" "$ngpu" local $model_flag ${LOCALIZER_ARGS:-} \
        || fail "stage 3 (localizer) failed" "$localizer_dir/exp_*.txt"
    if ! localizer_done; then
        echo "tools/reproduce_coco.sh: stage 3 (localizer) did not finish; see $localizer_dir/exp_*.txt" >&2
        exit 1
    fi
fi
echo "== done: $prompt_file, $relabelled_json, $localizer_dir/checkpoint.pth"
