#!/usr/bin/env bash
# CORA+ (the paper's Table 1 / 2 "CORA+" rows): the localizer retrained with pseudo boxes that a trained
# CORA model finds in the training images.
#
#   COCO: stage 1  tags        tools/caption_tags.py: image-level class tags from COCO's captions
#                              -> $data_path/annotations/coco_train_tags.json (skipped when TAGS is given)
#         stage 2  pseudo      tools/pseudo_label.py: each training image detected with its own tags,
#                              boxes scoring >= 0.2 -> $data_path/annotations/pseudo_label_thr0.2.json
#   LVIS: stage 2  pseudo      tools/pseudo_label.py: the norare training images detected with all classes of
#                              lvis_v1_val.json, the rare classes' boxes >= 0.2 kept -> $lvis_path/pseudo_label_thr0.2.json
#   both: stage 3  localizer   configs/<COCO|LVIS>/<variant>_...sh EXP NGPU local --pseudo_box <stage 2's file>
#
# Usage, from the repository root (after the CORA run whose checkpoint labels the images):
#   bash tools/cora_plus.sh coco R50x4 8 [EXP]      # EXP names the CORA+ run (default <RN50|RN50x4>_plus)
#   bash tools/cora_plus.sh lvis R50x4 8 [EXP]
# Environment: CHECKPOINT (default logs/<COCO|LVIS>/<config>/<RN50|RN50x4>/checkpoint_best.pth, the CORA run of
# tools/reproduce_coco.sh), TAGS (COCO: a ready {image_id: [class names]} file), CAPTIONS (default
# $data_path/annotations/captions_train2017.json), SYNONYMS (caption_tags.py --synonyms), CLIP_PATH
# (--model_path), PSEUDO_ARGS and LOCALIZER_ARGS (extra flags of stages 2 and 3). Each stage is skipped when its
# output exists; stage 2 resumes an interrupted run.
set -euo pipefail

dataset=${1:-coco}
variant=${2:-R50x4}
ngpu=${3:-8}
case "$dataset/$variant" in
    coco/R50|coco/R50x4) folder=COCO ;;
    lvis/R50|lvis/R50x4) folder=LVIS ;;
    *) echo "usage: bash tools/cora_plus.sh coco|lvis R50|R50x4 NGPU [EXP] (got '$dataset' '$variant')" >&2; exit 2 ;;
esac
backbone_name=RN${variant#R}
exp=${4:-${backbone_name}_plus}
export data_path=${data_path:-data/coco}
export lvis_path=${lvis_path:-data/lvis}
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
config=configs/$folder/${variant}_dab_ovd_3enc_apm128_splcls0.2_relabel_noinit.sh
checkpoint=${CHECKPOINT:-logs/$folder/$(basename "$config" .sh)/$backbone_name/checkpoint_best.pth}
model_flag=${CLIP_PATH:+--model_path $CLIP_PATH}
for f in "$config" "$checkpoint"; do
    if [ ! -f "$f" ]; then
        echo "tools/cora_plus.sh: $f not found (CHECKPOINT names the trained CORA model; run from the repository root)" >&2
        exit 2
    fi
done

if [ "$dataset" = coco ]; then
    pseudo=$data_path/annotations/pseudo_label_thr0.2.json
    tags=${TAGS:-$data_path/annotations/coco_train_tags.json}
    echo "== stage 1/3: tags -> $tags"
    if [ -f "$tags" ]; then
        echo "   exists, skipped"
    else
        python tools/caption_tags.py --captions "${CAPTIONS:-$data_path/annotations/captions_train2017.json}" \
            --categories "$data_path/annotations/instances_val2017_basetarget.json" --out "$tags" \
            ${SYNONYMS:+--synonyms "$SYNONYMS"}
    fi
    source_flags="--coco_path $data_path --cls_annotation_path $tags"
else
    pseudo=$lvis_path/pseudo_label_thr0.2.json
    echo "== stage 1/3: LVIS detects every class of lvis_v1_val.json, no tags"
    source_flags="--dataset_file lvis --lvis_path $lvis_path --vocabulary_json $lvis_path/lvis_v1_val.json --keep_frequency r"
fi

echo "== stage 2/3: pseudo boxes -> $pseudo"
if [ -f "$pseudo" ]; then
    echo "   exists, skipped"
else
    # shellcheck disable=SC2086  # the flag strings are word-split on purpose
    torchrun --standalone --nproc_per_node="$ngpu" tools/pseudo_label.py --resume "$checkpoint" $source_flags \
        --det_thr 0.2 --output "$pseudo" $model_flag ${PSEUDO_ARGS:-}
fi

echo "== stage 3/3: the localizer with the pseudo boxes -> logs/$folder/$(basename "$config" .sh)/$exp"
# shellcheck disable=SC2086
bash "$config" "$exp" "$ngpu" local --pseudo_box "$pseudo" $model_flag ${LOCALIZER_ARGS:-}
