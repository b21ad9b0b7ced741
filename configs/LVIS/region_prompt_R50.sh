# Region prompting on LVIS (stage 1 of the LVIS pipeline, tools/region_prompt.py --dataset_file lvis):
#   bash configs/LVIS/region_prompt_R50.sh EXP NGPU local [extra args]
# The RN50 counterpart of region_prompt_R50x4.sh (the original's region branch has only the RN50x4 one).
# Same values as the COCO configs (batch 4 per GPU, 5 epochs, lr drop after 4, lr_prompt 1e-4,
# text_len 25) on the base (common + frequent) boxes of lvis_v1_train_norare.json; accuracy is reported
# on lvis_v1_val.json's boxes, base = common + frequent, novel = rare. The prompt goes to the file the LVIS
# localizer config reads.
entry=tools/region_prompt.py
name=$0
. configs/controller.sh

args=" \
--dataset_file lvis \
--lvis_path $lvis_path \
--output_dir $work_dir \
--output logs/region_prompt_R50_lvis.pth \
--batch_size 4 \
--epochs 5 \
--lr_drop 4 \
--backbone clip_RN50 \
--lr_prompt 1e-4 \
--text_len 25 \
"

eval "$header$args$extra_args 2>&1 | tee -a $work_dir/exp_$now.txt"
