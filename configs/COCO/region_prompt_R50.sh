# Region prompting (stage 1 of the COCO pipeline, tools/region_prompt.py); same positional interface
# as the localizer configs:  bash configs/COCO/region_prompt_R50.sh EXP NGPU local [extra args]
# The values are the original region branch's configs/COCO_RN50.sh (batch 4 per GPU, 5 epochs, lr drop
# after 4, lr_prompt 1e-4, text_len 25); the prompt is written to the file the localizer config reads.
entry=tools/region_prompt.py
name=$0
. configs/controller.sh

args=" \
--coco_path $data_path \
--output_dir $work_dir \
--output logs/region_prompt_R50.pth \
--batch_size 4 \
--epochs 5 \
--lr_drop 4 \
--backbone clip_RN50 \
--lr_prompt 1e-4 \
--text_len 25 \
"

eval "$header$args$extra_args 2>&1 | tee -a $work_dir/exp_$now.txt"
