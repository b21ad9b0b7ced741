# The COCO localizer config's method on LVIS v1 (the paper's LVIS setting: rare classes never boxed in training).
# The original ships no LVIS localizer config; this one is configs/COCO/R50x4_...sh with LVIS's data, its
# 300 detections per image, APr for model selection and the rare classes boosted at evaluation:
#   bash configs/LVIS/R50x4_dab_ovd_3enc_apm128_splcls0.2_relabel_noinit.sh EXP NGPU local [extra args]
#   bash configs/LVIS/R50x4_dab_ovd_3enc_apm128_splcls0.2_relabel_noinit.sh test 8 local --resume ckpt.pth --eval
# $lvis_path (default data/lvis) holds lvis_v1_train_norare.json (train, no rare class), its CLIP-aligned
# relabelling lvis_v1_train_norare_relabel.json (tools/relabel.py --dataset_file lvis --backbone clip_RN50x4, the original's name),
# lvis_v1_val.json and train2017/ val2017/ (images by coco_url). --target_class_factor 8 boosts the rare classes
# (read from the val json's `frequency`) in pre-matching, as the COCO configs boost the 17 novel ones.
# --label_map: LVIS labels become category ranks, which the class gate of pre-matching compares.
name=$0
. configs/controller.sh

args=" \
--dataset_file lvis \
--lvis_path $lvis_path \
--label_map \
--output_dir $work_dir \
--batch_size 4 \
--epochs 35 \
--lr_drop 35 \
--backbone clip_RN50x4 \
--text_len 15 \
--region_prompt_path logs/region_prompt_R50x4_lvis.pth \
--save_every_epoch 50 \
--dim_feedforward 1024 \
--use_nms \
--num_queries 1000 \
--anchor_pre_matching \
--remove_misclassified \
--condition_on_text \
--enc_layers 3 \
--text_dim 640 \
--condition_bottleneck 128 \
--split_class_p 0.2 \
--model_ema \
--model_ema_decay 0.99996 \
--save_best \
--label_version RN50x4base \
--disable_init \
--target_class_factor 8 \
"

eval "$header$args$extra_args 2>&1 | tee -a $work_dir/exp_$now.txt"
