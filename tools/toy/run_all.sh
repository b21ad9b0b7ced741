#!/usr/bin/env bash
# The whole open-vocabulary pipeline on the toy world, on a CPU, with fixed seeds:
#
#   stage 1  world          python -m tools.toy.make_dataset        -> $data_path (detection set + captions)
#   stage 2  CLIP           python -m tools.toy.train_clip          -> $data_path/clip_toy.pt (+ .json report)
#   stage 3  region prompt  configs/toy/region_prompt_toy.sh        -> logs/region_prompt_toy.pth
#   stage 4  relabelling    tools/relabel.py                        -> $data_path/annotations/instances_train2017_base_RN50relabel.json
#   stage 5  localizer      configs/toy/toy_dab_ovd_apm_splcls0.2_relabel.sh (evaluates after epochs 6 and 12)
#                                                                   -> logs/toy/<config>/toy/{checkpoint.pth,log.txt}
#
# Usage, from the repository root:   bash tools/toy/run_all.sh [NPROC]   (default 2 processes per torchrun stage,
# one thread each: 2 CPU cores; the CLIP stage is one process with 2 threads)
# A stage is skipped when its output exists (stage 5: when log.txt records its last epoch). Wall times
# go to logs/toy/run_all_times.json. Optional environment: data_path (default data/toy), WORLD_ARGS,
# CLIP_ARGS, PROMPT_ARGS, RELABEL_ARGS, LOCALIZER_ARGS (extra flags of one stage).
set -euo pipefail

nproc=${1:-2}
export data_path=${data_path:-data/toy}
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( nproc > 1 ? 1 : 2 ))}
clip=$data_path/clip_toy.pt
prompt=logs/region_prompt_toy.pth
relabelled=$data_path/annotations/instances_train2017_base_RN50relabel.json
localizer_config=configs/toy/toy_dab_ovd_apm_splcls0.2_relabel.sh
localizer_dir=logs/toy/$(basename "$localizer_config" .sh)/toy
times=logs/toy/run_all_times.json  # run_stage (tools/toy/stage.sh) records the wall times there
# shellcheck source=tools/toy/stage.sh
. tools/toy/stage.sh

localizer_done() {
    python -m tools.toy.report finished "$localizer_dir"
}

# shellcheck disable=SC2086  # the *_ARGS strings are word-split on purpose
run_stage world "[ -f $data_path/toy_world.json ]" python -m tools.toy.make_dataset --out "$data_path" ${WORLD_ARGS:-}
# shellcheck disable=SC2086
run_stage clip "[ -f $clip ]" python -m tools.toy.train_clip --data "$data_path" --out "$clip" ${CLIP_ARGS:-}
# shellcheck disable=SC2086
run_stage region_prompt "[ -f $prompt ]" bash configs/toy/region_prompt_toy.sh toy "$nproc" local ${PROMPT_ARGS:-}
# shellcheck disable=SC2086
run_stage relabel "[ -f $relabelled ]" torchrun --standalone --nproc_per_node="$nproc" tools/relabel.py \
    --coco_path "$data_path" --backbone clip_toy --model_path "$clip" --region_prompt_path "$prompt" \
    --relabel_folder logs/relabel_toy --target_name "$relabelled" --image_scale 0.32 --num_workers 1 \
    ${RELABEL_ARGS:-}
# shellcheck disable=SC2086
run_stage localizer localizer_done bash "$localizer_config" toy "$nproc" local ${LOCALIZER_ARGS:-}

echo "== done; wall time per stage (s): $(tr -d '\n ' < "$times")"
python -m tools.toy.report summary "$localizer_dir"
