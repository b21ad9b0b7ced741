"""CORA: train and evaluate the localizer.

Launch (see README and configs/):
    bash configs/COCO/R50_dab_ovd_3enc_apm128_splcls0.2_relabel_noinit.sh RN50 8 local
    bash configs/COCO/R50_dab_ovd_3enc_apm128_splcls0.2_relabel_noinit.sh test 8 local --resume ckpt.pth --eval
    torchrun --nproc_per_node=8 main.py <flags>        # what the config's `local` mode runs
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, SequentialSampler

from datasets import build_dataset, get_coco_api_from_dataset
from datasets.ovd_eval import CocoOVDEvaluator, LvisEvaluator
from engine import evaluate, train_one_epoch
from models import build_model
from util import dist
from util.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from util.ema import ModelEMA
from util.nested_tensor import collate_fn
from util.optim import build_optimizer
from util.rng import rng_state, set_rng_state
from util.run_info import write_run_info


def get_args_parser() -> argparse.ArgumentParser:
    """Every flag the original configs pass, with the original's defaults and meaning (README table)."""
    p = argparse.ArgumentParser("CORA", add_help=True)
    # optimisation
    p.add_argument("--lr", default=1e-4, type=float)
    p.add_argument("--batch_size", default=2, type=int, help="images per process (train and val)")
    p.add_argument("--weight_decay", default=1e-4, type=float)
    p.add_argument("--epochs", default=50, type=int,
                   help="also selects input_proj: < 25 adds GroupNorm (the original's accident)")
    p.add_argument("--lr_drop", default=40, type=int)
    p.add_argument("--clip_max_norm", default=0.1, type=float)
    p.add_argument("--seed", default=42, type=int)
    # CLIP
    p.add_argument("--backbone", default="clip_RN50", type=str, help="clip_RN50 or clip_RN50x4")
    p.add_argument("--image_scale", default=1.0, type=float,
                   help="multiplies the transforms' image sizes (1: 800 px val, 480-800 train; the toy world 0.32)")
    p.add_argument("--model_path", default="", type=str,
                   help="OpenAI-format CLIP archive (default ~/.cache/clip/<name>.pt), for both towers")
    p.add_argument("--text_len", default=77, type=int, help="context length of the text classifier")
    p.add_argument("--region_prompt_path", default="", type=str,
                   help="region prompt file {'attnpool.positional_embedding': [S*S+1, E]}")
    p.add_argument("--pe_temperature", default=20, type=int)
    # detector
    p.add_argument("--enc_layers", default=6, type=int)
    p.add_argument("--dec_layers", default=6, type=int)
    p.add_argument("--dim_feedforward", default=2048, type=int)
    p.add_argument("--hidden_dim", default=256, type=int)
    p.add_argument("--dropout", default=0.1, type=float)
    p.add_argument("--nheads", default=8, type=int)
    p.add_argument("--num_queries", default=300, type=int)
    p.add_argument("--text_dim", default=1024, type=int, help="CLIP embedding size (RN50 1024, RN50x4 640)")
    p.add_argument("--condition_bottleneck", default=128, type=int, help="hidden size of text_proj")
    p.add_argument("--anchor_pre_matching", action="store_true",
                   help="classify the anchors with CLIP before the decoder (the configs' setting); off: class-agnostic")
    p.add_argument("--condition_on_text", action="store_true",
                   help="content queries = projected text embedding of the pre-matched class; off: zeros")
    p.add_argument("--disable_init", action="store_true", help="no focal prior on the objectness bias")
    p.add_argument("--target_class_factor", default=1.0, type=float,
                   help="eval-only boost of novel-class probabilities in pre-matching (COCO-65 / LVIS lists)")
    p.add_argument("--no_aux_loss", dest="aux_loss", action="store_false")
    # matcher and losses
    p.add_argument("--remove_misclassified", action="store_true")
    p.add_argument("--set_cost_class", default=2.0, type=float)
    p.add_argument("--set_cost_bbox", default=5.0, type=float)
    p.add_argument("--set_cost_giou", default=2.0, type=float)
    p.add_argument("--matcher_backend", default="auto", choices=["auto", "torch", "scipy"],
                   help="exact assignment solver: batched torch or scipy; auto = torch on CUDA, scipy on CPU")
    p.add_argument("--cls_loss_coef", default=2.0, type=float)
    p.add_argument("--bbox_loss_coef", default=5.0, type=float)
    p.add_argument("--giou_loss_coef", default=2.0, type=float)
    p.add_argument("--focal_alpha", default=0.25, type=float)
    p.add_argument("--split_class_p", default=0.0, type=float, help="probability of split-class iterations")
    # post-processing
    p.add_argument("--use_nms", action="store_true")
    p.add_argument("--no_nms", action="store_true", help="overrides --use_nms")
    p.add_argument("--no_prune_eval", action="store_true",
                   help="CLIP-score all queries at eval (default: only those that can change the detections; "
                        "the detections and scores are the same)")
    # data
    p.add_argument("--dataset_file", default="coco", choices=["coco", "lvis"])
    p.add_argument("--coco_path", default="data/coco", type=str)
    p.add_argument("--lvis_path", default="", type=str)
    p.add_argument("--ovd", action="store_true", help="COCO OVD json files")
    p.add_argument("--label_version", default="", type=str, help="training json (see README)")
    p.add_argument("--eval_target", action="store_true", help="validate on instances_val2017_target.json")
    p.add_argument("--label_map", action="store_true", help="LVIS: contiguous labels")
    p.add_argument("--repeat_factor_sampling", action="store_true", help="LVIS")
    p.add_argument("--repeat_threshold", default=0.001, type=float)
    p.add_argument("--num_workers", default=2, type=int)
    # EMA, checkpoints, runs
    p.add_argument("--model_ema", action="store_true")
    p.add_argument("--model_ema_decay", default=0.99992, type=float)
    p.add_argument("--no_model_ema", action="store_true", help="overrides --model_ema")
    p.add_argument("--output_dir", default="", type=str)
    p.add_argument("--resume", default="", type=str)
    p.add_argument("--no_auto_resume", action="store_true")
    p.add_argument("--start_epoch", default=0, type=int)
    p.add_argument("--eval", action="store_true")
    p.add_argument("--eval_every_epoch", default=1, type=int)
    p.add_argument("--save_every_epoch", default=5, type=int)
    p.add_argument("--save_best", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dist_url", default="env://")
    return p



def rare_class_indices(dataset) -> list[int] | None:
    """LVIS: indices (into the category list) of the rare classes, read from the json's `frequency`."""
    cats = getattr(dataset, "coco", None) and dataset.coco.cats
    if not cats or "frequency" not in next(iter(cats.values())):
        return None
    return [i for i, cat_id in enumerate(dataset.label2catid) if cats[cat_id]["frequency"] == "r"]


def build_evaluator(args, dataset):
    if args.dataset_file == "lvis":
        return LvisEvaluator(dataset.ann_file, dataset.label2catid)
    return CocoOVDEvaluator(get_coco_api_from_dataset(dataset), dataset.label2catid)


def best_metric(args, stats) -> float:
    """Model selection: novel AP50 (COCO OVD, percent) or APr (LVIS)."""
    return float(stats["APr"]) if args.dataset_file == "lvis" else float(stats[13])


def make_loaders(args, dataset_train, dataset_val):
    if args.distributed:
        if dataset_train is not None and args.repeat_factor_sampling and args.dataset_file == "lvis":
            from datasets.lvis import DistributedWeightedSampler

            sampler_train = DistributedWeightedSampler(weights=dataset_train.rep_factors)
        else:
            sampler_train = DistributedSampler(dataset_train) if dataset_train is not None else None
        sampler_val = DistributedSampler(dataset_val, shuffle=False)
    else:
        # One replica: the shuffle is seeded by the epoch (set_epoch), so a resumed run sees the same order.
        sampler_train = (DistributedSampler(dataset_train, num_replicas=1, rank=0, seed=args.seed)
                         if dataset_train is not None else None)
        sampler_val = SequentialSampler(dataset_val)
    loader_train = None
    if dataset_train is not None:
        batches = BatchSampler(sampler_train, args.batch_size, drop_last=True)
        loader_train = DataLoader(dataset_train, batch_sampler=batches, collate_fn=collate_fn,
                                  num_workers=args.num_workers)
    loader_val = DataLoader(dataset_val, args.batch_size, sampler=sampler_val, drop_last=False,
                            collate_fn=collate_fn, num_workers=args.num_workers)
    return sampler_train, loader_train, loader_val


def run_evaluation(args, model, criterion, postprocessors, loader_val, dataset_val, device, output_dir):
    evaluator = build_evaluator(args, dataset_val)
    novel = rare_class_indices(dataset_val) if args.dataset_file == "lvis" else None
    test_stats, evaluator = evaluate(model, criterion, postprocessors, loader_val, evaluator, device,
                                     categories=dataset_val.category_list, novel_indices=novel)
    stats = test_stats["coco_eval_bbox"]
    if dist.is_main_process() and output_dir:
        with open(output_dir / "results_bbox.json", "w") as f:
            json.dump(evaluator.results_json(), f)
        if hasattr(evaluator, "table"):
            print(evaluator.table(), flush=True)
    return test_stats, stats, evaluator


def main(args):
    if args.split_class_p > 0 and not args.anchor_pre_matching:
        raise ValueError(f"--split_class_p {args.split_class_p} needs --anchor_pre_matching: it splits the classes "
                         "the anchors are pre-matched to")
    dist.init_distributed_mode(args)
    if args.no_model_ema:
        args.model_ema = False
    print(args)
    device = torch.device(args.device)
    seed = args.seed + dist.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)

    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir and dist.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        write_run_info(str(output_dir), args)
    if not args.resume and not args.no_auto_resume and output_dir and (output_dir / "checkpoint.pth").exists():
        args.resume = str(output_dir / "checkpoint.pth")
        print(f"auto-resume from {args.resume}")
    checkpoint = load_checkpoint(args.resume) if args.resume else None

    # A full checkpoint holds every weight (CLIP included): no archive or region prompt is opened then.
    model, criterion, postprocessors = build_model(args, checkpoint_weights=checkpoint["model"] if checkpoint else None)
    model.to(device)
    if checkpoint is not None:
        load_model_state(model, checkpoint["model"], strict=True)
    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None,
            # text_proj only works on pre-matched, text-conditioned queries
            find_unused_parameters=not (args.anchor_pre_matching and args.condition_on_text))
        model_without_ddp = model.module
    model_ema = None
    if args.model_ema:
        # Copied after DDP has broadcast rank 0's weights. The original copies before wrapping, so with
        # seed + rank every rank's EMA starts from its own random initialisation and the evaluations during
        # training differ on the images of ranks other than 0 (checkpoints hold rank 0's EMA either way).
        model_ema = ModelEMA(model_without_ddp, args.model_ema_decay)
        if checkpoint is not None:
            ema_weights = checkpoint.get("model_ema")
            if isinstance(ema_weights, dict):
                load_model_state(model_ema.module, ema_weights, strict=True)
            else:
                # Unlike the original (which would evaluate its freshly initialised EMA copy), an EMA
                # missing from the checkpoint starts from the checkpoint's model weights.
                print(f"{args.resume} has no model_ema: the EMA starts from its model weights")
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    print("Total number of params in model:", n_parameters)

    optimizer, lr_scheduler = build_optimizer(model_without_ddp, lr=args.lr, weight_decay=args.weight_decay,
                                              lr_drop=args.lr_drop)
    dataset_val = build_dataset("val", args)
    dataset_train = None if args.eval else build_dataset("train", args)
    sampler_train, loader_train, loader_val = make_loaders(args, dataset_train, dataset_val)
    eval_model = model_ema.module if model_ema is not None else model

    if args.eval:
        _, stats, evaluator = run_evaluation(args, eval_model, criterion, postprocessors, loader_val, dataset_val,
                                             device, output_dir)
        if output_dir and dist.is_main_process():
            torch.save(evaluator.eval_state(), output_dir / "eval.pth")
        return stats

    best_performance = 0.0
    if checkpoint is not None and all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
        optimizer.load_state_dict(checkpoint["optimizer"])
        lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        args.start_epoch = checkpoint["epoch"] + 1
        best_performance = checkpoint.get("best_performance", 0.0)
        if "rng_state" in checkpoint:
            set_rng_state(checkpoint["rng_state"])
    del checkpoint

    def snapshot(epoch: int, best: float) -> dict:
        """The original's checkpoint layout, plus the RNG states for an exact resume."""
        return {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "args": args, "best_performance": best,
                "model_ema": model_ema.state_dict() if model_ema is not None else -1, "rng_state": rng_state()}

    print("Start training")
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        if hasattr(sampler_train, "set_epoch"):
            sampler_train.set_epoch(epoch)
        train_stats = train_one_epoch(model, criterion, loader_train, optimizer, device, epoch,
                                      categories=dataset_train.category_list, max_norm=args.clip_max_norm,
                                      model_ema=model_ema, split_class_p=args.split_class_p)
        lr_scheduler.step()


        if output_dir and dist.is_main_process():
            save_checkpoint(snapshot(epoch, best_performance), output_dir / "checkpoint.pth")
            if (epoch + 1) % args.save_every_epoch == 0:
                save_checkpoint(snapshot(epoch, best_performance), output_dir / f"checkpoint{epoch:04}.pth")

        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch,
                     "n_parameters": n_parameters}
        if (epoch + 1) % args.eval_every_epoch == 0:
            # Evaluation draws random numbers too (the val resize's random.choice, loader seeds); it leaves
            # the states as it found them, so that a run resumed from checkpoint.pth continues identically.
            state = rng_state()
            test_stats, stats, evaluator = run_evaluation(args, eval_model, criterion, postprocessors, loader_val,
                                                          dataset_val, device, output_dir)
            set_rng_state(state)
            log_stats.update({f"test_{k}": v for k, v in test_stats.items()})
            performance = best_metric(args, stats)
            if performance > best_performance:
                best_performance = performance
                if args.save_best and output_dir and dist.is_main_process():
                    save_checkpoint(snapshot(epoch, best_performance), output_dir / "checkpoint_best.pth")
            if output_dir and dist.is_main_process():
                (output_dir / "eval").mkdir(exist_ok=True)
                state = evaluator.eval_state()
                torch.save(state, output_dir / "eval" / "latest.pth")
                torch.save(state, output_dir / "eval" / f"{epoch:04}.pth")
        if output_dir and dist.is_main_process():
            with (output_dir / "log.txt").open("a") as f:
                f.write(json.dumps(log_stats) + "\n")
    total = time.time() - start_time
    print(f"Training time {time.strftime('%H:%M:%S', time.gmtime(total))}")
    return None


if __name__ == "__main__":
    main(get_args_parser().parse_args())
