#!/usr/bin/env bash
# The paper's other results in miniature, from the bundled CORA model (assets/toy, README "CORA in miniature"):
#
#   1. the novel boost: the bundled model evaluated with --target_class_factor 1 and 8 (the toy's 4 novel
#      classes in the COCO novel classes' role), on its val set and on 200 scenes of a world it never saw
#   2. CORA+: captions of the training scenes (tools/toy/scene_captions.py) -> image-level tags
#      (tools/caption_tags.py) -> pseudo boxes from the bundled model (tools/pseudo_label.py, score >= 0.2, the
#      original's threshold, and >= 0.15, where the toy model's novel pseudo boxes balance precision and
#      recall), their precision / recall against the world's true boxes -> the localizer retrained from
#      scratch with --pseudo_box (the toy config, 12 epochs) -> val and unseen-world AP50
#   3. LVIS: the world in LVIS v1 format (tools/toy/to_lvis.py; the novel classes rare) -> CLIP-aligned labels
#      (tools/relabel.py --dataset_file lvis) -> configs/LVIS/R50_...sh at toy size (12 epochs): APr / APc / APf / AP
#
# Usage, from the repository root:   bash tools/toy/cora_plus_lvis.sh
# Each run_stage is skipped when its output exists. The table goes to logs/toy/extensions.md, wall times to
# logs/toy/run_all_times.json. Optional environment: data_path (default data/toy), lvis_path (data/toy_lvis),
# CORA_PLUS_ARGS, LVIS_ARGS (extra flags of the two trainings).
set -euo pipefail
export data_path=${data_path:-data/toy}
export lvis_path=${lvis_path:-data/toy_lvis}
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # 2 processes, one per core
toy=assets/toy
unseen=${data_path}_seed1
out=logs/toy/extensions
model_flags="--model_path $toy/clip_toy.pt --region_prompt_path $toy/region_prompt_toy.pth"
config=configs/toy/toy_dab_ovd_apm_splcls0.2_relabel.sh
runs=logs/toy/$(basename "$config" .sh)
lvis_config=configs/LVIS/R50_dab_ovd_3enc_apm128_splcls0.2_relabel_noinit.sh
annotations=$data_path/annotations
mkdir -p "$out"

# shellcheck source=tools/toy/stage.sh
. tools/toy/stage.sh

evaluated() {  # evaluated RUN-DIR: an --eval line is in its log.txt
    [ -f "$1/log.txt" ] && grep -q '"eval"' "$1/log.txt"
}

# The world and the bundled CLIP's CLIP-aligned labels (stages 1 and 4 of run_all.sh; skipped when it ran).
run_stage world "[ -f $data_path/toy_world.json ]" python -m tools.toy.make_dataset --out "$data_path"
run_stage unseen_world "[ -f $unseen/toy_world.json ]" python -m tools.toy.make_dataset --out "$unseen" --seed 1 \
    --train 0 --val 200 --captions 0 --test_per_class 0
# shellcheck disable=SC2086  # the flag strings are word-split on purpose
run_stage relabel "[ -f $annotations/instances_train2017_base_RN50relabel.json ]" \
    torchrun --standalone --nproc_per_node=2 tools/relabel.py --coco_path "$data_path" --backbone clip_toy \
    $model_flags --relabel_folder logs/relabel_toy --image_scale 0.32 --num_workers 1 \
    --target_name "$annotations/instances_train2017_base_RN50relabel.json"

# 1. the novel boost of the bundled model
for factor in 1 8; do
    # shellcheck disable=SC2086
    run_stage "eval_tcf$factor" "evaluated $runs/tcf$factor" bash "$config" "tcf$factor" 2 local --resume $toy/cora_toy.pth \
        --eval --target_class_factor $factor $model_flags
    # shellcheck disable=SC2086
    run_stage "eval_tcf${factor}_unseen" "evaluated $runs/tcf${factor}_unseen" env data_path="$unseen" bash "$config" \
        "tcf${factor}_unseen" 2 local --resume $toy/cora_toy.pth --eval --target_class_factor $factor $model_flags
done

# 2. CORA+
run_stage captions "[ -f $annotations/captions_train2017.json ]" python -m tools.toy.scene_captions --data "$data_path"
run_stage tags "[ -f $annotations/train_tags.json ]" python tools/caption_tags.py \
    --captions "$annotations/captions_train2017.json" --categories "$annotations/instances_val2017_basetarget.json" \
    --out "$annotations/train_tags.json"
for thr in 0.2 0.15; do
    pseudo=$annotations/pseudo_label_thr$thr.json
    exp=cora_plus$([ "$thr" = 0.2 ] || echo "_thr$thr")
    # shellcheck disable=SC2086
    run_stage "pseudo_label_thr$thr" "[ -f $pseudo ]" torchrun --standalone --nproc_per_node=2 tools/pseudo_label.py \
        --resume $toy/cora_toy.pth $model_flags --coco_path "$data_path" \
        --cls_annotation_path "$annotations/train_tags.json" --det_thr $thr --output "$pseudo"
    python -m tools.toy.report pseudo "$pseudo" "$annotations/instances_train2017_all.json" \
        --out "$out/pseudo_quality_thr$thr.json"
    # shellcheck disable=SC2086
    run_stage "localizer_$exp" "python -m tools.toy.report finished $runs/$exp" bash "$config" "$exp" 2 local \
        --pseudo_box "$pseudo" $model_flags ${CORA_PLUS_ARGS:-}
    # shellcheck disable=SC2086
    run_stage "eval_${exp}_unseen" "evaluated $runs/${exp}_unseen" env data_path="$unseen" bash "$config" \
        "${exp}_unseen" 2 local --resume "$runs/$exp/checkpoint.pth" --eval $model_flags
done

# 3. LVIS
run_stage lvis_format "[ -f $lvis_path/lvis_v1_val.json ]" python -m tools.toy.to_lvis --data "$data_path" --out "$lvis_path"
# shellcheck disable=SC2086
run_stage lvis_relabel "[ -f $lvis_path/lvis_v1_train_norare_RN50relabel.json ]" \
    torchrun --standalone --nproc_per_node=2 tools/relabel.py --dataset_file lvis --lvis_path "$lvis_path" \
    --backbone clip_toy $model_flags --relabel_folder logs/relabel_toy_lvis --image_scale 0.32 --num_workers 1 \
    --target_name "$lvis_path/lvis_v1_train_norare_RN50relabel.json"
# The LVIS config with the toy config's sizes and schedule (later flags win).
toy_sizes="--batch_size 2 --lr 1e-3 --epochs 12 --lr_drop 10 --backbone clip_toy --image_scale 0.32 --hidden_dim 64 \
--nheads 4 --dim_feedforward 256 --num_queries 100 --enc_layers 1 --dec_layers 3 --text_dim 64 --condition_bottleneck 32 \
--model_ema_decay 0.995 --eval_every_epoch 6 --num_workers 1"
# shellcheck disable=SC2086
run_stage localizer_lvis "python -m tools.toy.report finished logs/LVIS/$(basename "$lvis_config" .sh)/toy" \
    bash "$lvis_config" toy 2 local --lvis_path "$lvis_path" $toy_sizes $model_flags ${LVIS_ARGS:-}

python -m tools.toy.report extensions --out logs/toy/extensions.md
