"""The shipped configs parse with main.py's parser and hold the original's values (SPEC §1.2)."""
import os
import re
import shlex

import pytest

from main import get_args_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "R50": "configs/COCO/R50_dab_ovd_3enc_apm128_splcls0.2_relabel_noinit.sh",
    "R50x4": "configs/COCO/R50x4_dab_ovd_3enc_apm128_splcls0.2_relabel_noinit.sh",
}
COMMON = dict(batch_size=4, epochs=35, lr_drop=35, text_len=15, ovd=True, save_every_epoch=50, dim_feedforward=1024,
              use_nms=True, num_queries=1000, anchor_pre_matching=True, remove_misclassified=True,
              condition_on_text=True, enc_layers=3, condition_bottleneck=128, split_class_p=0.2, model_ema=True,
              model_ema_decay=0.99996, save_best=True, disable_init=True, target_class_factor=8.0,
              dec_layers=6, hidden_dim=256, nheads=8, dropout=0.1, lr=1e-4, clip_max_norm=0.1)
SPECIFIC = {
    "R50": dict(backbone="clip_RN50", text_dim=1024, region_prompt_path="logs/region_prompt_R50.pth",
                label_version="RN50base"),
    "R50x4": dict(backbone="clip_RN50x4", text_dim=640, region_prompt_path="logs/region_prompt_R50x4.pth",
                  label_version="RN50x4base_prev"),
}


def config_flags(path):
    text = open(os.path.join(ROOT, path)).read()
    block = re.search(r'args="(.*?)"', text, re.S).group(1)
    block = block.replace("\\\n", " ").replace("$data_path", "/data/coco").replace("$work_dir", "/tmp/work")
    return shlex.split(block)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_flags_parse_with_original_values(name):
    args = get_args_parser().parse_args(config_flags(CONFIGS[name]))
    for key, value in {**COMMON, **SPECIFIC[name]}.items():
        assert getattr(args, key) == value, key
    assert args.coco_path == "/data/coco" and args.output_dir == "/tmp/work"
