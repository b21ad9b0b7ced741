"""What a CORA checkpoint is, and whether it loads: backbone, epoch, EMA, sizes, strict load.

    python tools/inspect_checkpoint.py /path/to/checkpoint.pth

Builds the model the checkpoint's shapes describe (no CLIP archive needed) and loads `model` and
`model_ema` strictly; exits non-zero with the offending keys when they do not fit.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import args_for_weights, build_model, clip_state_dict_from_detector  # noqa: E402
from models.clip import architecture_from_state_dict  # noqa: E402
from util.checkpoint import load_checkpoint, load_model_state, pick_weights  # noqa: E402


def inspect(path: str) -> dict:
    checkpoint = load_checkpoint(path)
    weights = pick_weights(checkpoint, use_ema=False, source=path)
    args = args_for_weights(weights, checkpoint.get("args"))
    model, _, _ = build_model(args, checkpoint_weights=weights)
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
        "queries": args.num_queries,
        "encoder/decoder layers": (args.enc_layers, args.dec_layers),
        "trainable parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "loads strictly": True,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    for key, value in inspect(parser.parse_args().checkpoint).items():
        print(f"{key:>24}: {value}")
