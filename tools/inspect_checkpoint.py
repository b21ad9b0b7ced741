"""What a CORA checkpoint is, and whether it loads: backbone, epoch, EMA, sizes, strict load.

    python tools/inspect_checkpoint.py /path/to/checkpoint.pth

Builds the model the checkpoint's shapes and stored flags describe (no CLIP archive needed), loads
`model` and `model_ema` strictly (exits non-zero with the offending keys when they do not fit), and
prints the network flags a run must use with it (`main.py --resume` refuses other values).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import ModelConfig, build_model  # noqa: E402
from models.clip import architecture_from_state_dict, clip_state_dict_from_detector  # noqa: E402
from models.config import NETWORK_FIELDS  # noqa: E402
from util.checkpoint import load_checkpoint, load_model_state, pick_weights  # noqa: E402


def inspect(path: str) -> dict:
    checkpoint = load_checkpoint(path)
    weights = pick_weights(checkpoint, use_ema=False, source=path)
    cfg = ModelConfig.from_checkpoint(weights, checkpoint.get("args"))
    model, _, _ = build_model(cfg, checkpoint_weights=weights)
    load_model_state(model, weights, source=f"{path} ['model']")
    has_ema = isinstance(checkpoint.get("model_ema"), dict)
    if has_ema:
        load_model_state(model, checkpoint["model_ema"], source=f"{path} ['model_ema']")
    arch = architecture_from_state_dict(clip_state_dict_from_detector(weights), source=path)
    return {
        "backbone": f"CLIP ModifiedResNet layers {arch.vision_layers}, width {arch.vision_width}, "
                    f"embedding {arch.output_dim}, attention-pool grid {arch.attnpool_grid}",
        "epoch": checkpoint.get("epoch"),
        "best_performance": checkpoint.get("best_performance"),
        "model_ema": has_ema,
        "trainable parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "loads strictly": True,
        "network flags": " ".join(_flag(name, getattr(cfg, name)) for name in NETWORK_FIELDS),
    }


def _flag(name: str, value) -> str:
    if name == "input_proj_groupnorm":
        return "--epochs <25" if value else "--epochs >=25"
    if isinstance(value, bool):
        return f"--{name}" if value else f"(no --{name})"
    return f"--{name} {value}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    for key, value in inspect(parser.parse_args().checkpoint).items():
        print(f"{key:>24}: {value}")
