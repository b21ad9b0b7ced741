# The localizer on the toy world (stage 5 of tools/toy/run_all.sh): the COCO config's method
# (anchor pre-matching, text-conditioned queries, split_class, CLIP-aligned labels, EMA) at toy sizes:
#   bash configs/toy/toy_dab_ovd_apm_splcls0.2_relabel.sh EXP NPROC local [extra args]
# The batch is per process: tools/toy/run_all.sh runs 2 processes (one per core), 4 images per step.
# --text_dim is the toy CLIP's embedding size (64); --target_class_factor 1 because the novel boost
# is defined for the COCO-65 / LVIS vocabularies only.
# Ablations (tools/toy/ablation.sh) through the environment: label_version= trains on the annotated labels
# instead of the CLIP-aligned ones; apm=0 gives class-agnostic queries (no pre-matching, no text
# conditioning, no class mask in matching, no class split).
name=$0
data_path=${data_path:-data/toy}
label_version=${label_version-RN50base}
if [ "${apm:-1}" = 1 ]; then
    method="--anchor_pre_matching --remove_misclassified --condition_on_text --split_class_p 0.2"
else
    method=""
fi
. configs/controller.sh

args=" \
--coco_path $data_path \
--output_dir $work_dir \
--batch_size 2 \
--lr 1e-3 \
--epochs 12 \
--lr_drop 10 \
--backbone clip_toy \
--model_path $data_path/clip_toy.pt \
--text_len 15 \
--ovd \
--region_prompt_path logs/region_prompt_toy.pth \
--image_scale 0.32 \
--save_every_epoch 50 \
--hidden_dim 64 \
--nheads 4 \
--dim_feedforward 256 \
--use_nms \
--num_queries 100 \
$method \
--enc_layers 1 \
--dec_layers 3 \
--text_dim 64 \
--condition_bottleneck 32 \
--model_ema \
--model_ema_decay 0.995 \
--save_best \
--eval_every_epoch 6 \
--label_version '$label_version' \
--disable_init \
--target_class_factor 1 \
--num_workers 1 \
"

eval "$header$args$extra_args 2>&1 | tee -a $work_dir/exp_$now.txt"
