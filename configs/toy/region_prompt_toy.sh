# Region prompting on the toy world (stage 3 of tools/toy/run_all.sh); the interface of the COCO configs:
#   bash configs/toy/region_prompt_toy.sh EXP NPROC local [extra args]
# data_path (default data/toy) holds the world and its CLIP (clip_toy.pt, tools/toy/train_clip.py).
# Images stay at their 256 px (--image_scale 0.32 of the original's 800), so it runs on a CPU.
entry=tools/region_prompt.py
name=$0
data_path=${data_path:-data/toy}
. configs/controller.sh

args=" \
--coco_path $data_path \
--output_dir $work_dir \
--output logs/region_prompt_toy.pth \
--model_path $data_path/clip_toy.pt \
--backbone clip_toy \
--batch_size 8 \
--epochs 2 \
--lr_drop 1 \
--lr_prompt 1e-3 \
--text_len 25 \
--image_scale 0.32 \
--num_workers 1 \
"

eval "$header$args$extra_args 2>&1 | tee -a $work_dir/exp_$now.txt"
