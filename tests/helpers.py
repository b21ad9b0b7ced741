"""Helpers shared by several test modules (test modules never import each other)."""
from __future__ import annotations

import argparse
from pathlib import Path

import main as cora_main
from tests import golden


def main_argv(coco_root: Path, output_dir: Path, *extra: str) -> list[str]:
    """main.py's flags for the tiny COCO-OVD set (tests/tiny_coco.py) and the golden miniature CLIP: the
    published config's method at toy sizes, one epoch; later flags in `extra` win."""
    return [
        "--coco_path", str(coco_root), "--output_dir", str(output_dir), "--batch_size", "2", "--epochs", "1",
        "--lr_drop", "35", "--backbone", "clip_RN50", "--model_path", golden.path("clip_tiny.pt"),
        "--text_len", "15", "--ovd", "--region_prompt_path", golden.path("region_prompt_tiny.pth"),
        "--dim_feedforward", "64", "--use_nms", "--num_queries", "30", "--anchor_pre_matching",
        "--remove_misclassified", "--condition_on_text", "--enc_layers", "1", "--dec_layers", "2",
        "--text_dim", "64", "--split_class_p", "0.5", "--model_ema", "--model_ema_decay", "0.9", "--save_best",
        "--label_version", "RN50base", "--disable_init", "--target_class_factor", "8", "--num_workers", "0",
        "--device", "cpu", *extra,
    ]


def run_main(coco_root: Path, output_dir: Path, *extra: str):
    """`main.main` in this process with `main_argv`; returns what it returns (eval: the statistics)."""
    return cora_main.main(cora_main.get_args_parser().parse_args(main_argv(coco_root, output_dir, *extra)))


def parsed_args(*argv: str, **overrides):
    """main.py's parser on `argv`, then `overrides` for flags it defines (a name it does not define is an
    error, so a test cannot hand a builder a flag main.py lacks)."""
    args = cora_main.get_args_parser().parse_args(list(argv))
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise AttributeError(f"main.py defines no flag --{key}")
        setattr(args, key, value)
    return args


def golden_checkpoint_copy(*weight_changes, args_change=None) -> dict:
    """A copy of the golden checkpoint_tiny.pth (model, model_ema, args, epoch): each of `weight_changes`
    edits both weight sets in place, `args_change` the stored args."""
    ck = golden.load("checkpoint_tiny.pth")
    out = {"args": argparse.Namespace(**vars(ck["args"])), "epoch": ck["epoch"]}
    for key in ("model", "model_ema"):
        out[key] = dict(ck[key])
        for change in weight_changes:
            change(out[key])
    if args_change is not None:
        args_change(out["args"])
    return out


def cut_queries(weights: dict, n: int = 30) -> None:
    """Keep the first `n` anchors of a state dict (a faster model for tests)."""
    weights["query_embed.weight"] = weights["query_embed.weight"][:n].clone()


def toy_dataset_args(root: Path):
    """main.py's flags that open a toy world (tools/toy/make_dataset.py) as the COCO-OVD loader does."""
    return parsed_args("--coco_path", str(root), "--ovd", "--backbone", "clip_RN50")


def golden_train_targets(inputs_name: str = "inputs.pth") -> list[dict]:
    """The golden batch's targets as the dataset hands them to the training loop (labels into the 48 base names)."""
    return [{"boxes": t["boxes"], "labels": t["labels_train"], "image_id": t["image_id"],
             "orig_size": t["orig_size"], "size": t["size"]} for t in golden.load(inputs_name)["targets"]]
