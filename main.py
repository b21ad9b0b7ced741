"""CORA: train and evaluate the localizer.

Launch (see README and configs/):
    bash configs/COCO/R50_dab_ovd_3enc_apm128_splcls0.2_relabel_noinit.sh RN50 8 local
    bash configs/COCO/R50_dab_ovd_3enc_apm128_splcls0.2_relabel_noinit.sh test 8 local --resume ckpt.pth --eval
    torchrun --nproc_per_node=8 main.py <flags>        # what the config's `local` mode runs
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, SequentialSampler

from datasets import build_dataset, get_coco_api_from_dataset
from datasets.ovd_eval import CocoOVDEvaluator, LvisEvaluator
from engine import evaluate, train_one_epoch
from models import ModelConfig, build_model, load_detector_weights
from models.prematch import resolve_boost
from util import dist
from util.checkpoint import CheckpointError, load_checkpoint, load_model_state, save_checkpoint
from util.ema import ModelEMA
from util.nested_tensor import collate_fn
from util.numerics import set_tf32
from util.optim import build_optimizer
from util.rng import checkpoint_rng_state, rng_state, set_rng_state
from util.run import append_log, logged_epochs, resume_path, run_cli, start_run


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
    p.add_argument("--lvis_path", default="", type=str,
                   help="LVIS: folder with lvis_v1_train_norare.json, lvis_v1_val.json and the image folders")
    p.add_argument("--ovd", action="store_true", help="COCO OVD json files")
    p.add_argument("--label_version", default="", type=str, help="training json (see README)")
    p.add_argument("--eval_target", action="store_true", help="validate on instances_val2017_target.json")
    p.add_argument("--no_target_eval", action="store_true",
                   help="LVIS: validate on lvis_v1_val_norare.json (no rare classes) instead of lvis_v1_val.json")
    p.add_argument("--label_map", action="store_true",
                   help="LVIS: labels = rank of the category id (needed for the class gate of pre-matching)")
    p.add_argument("--repeat_factor_sampling", action="store_true", help="LVIS")
    p.add_argument("--repeat_threshold", default=0.001, type=float)
    p.add_argument("--pseudo_box", default="", type=str,
                   help="CORA+: pseudo boxes (tools/pseudo_label.py's json) added to the training images")
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
    p.add_argument("--allow_tf32", action="store_true",
                   help="TF32 matmuls and cuDNN convolutions in training (Ampere or later GPUs; speed only, default "
                        "off: full fp32 as the original). Evaluation always runs without TF32 (util/numerics.py)")
    return p



def build_evaluator(args, dataset):
    if args.dataset_file == "lvis":
        return LvisEvaluator(dataset.ann_file, dataset.label2catid)
    return CocoOVDEvaluator(get_coco_api_from_dataset(dataset), dataset.label2catid)


def best_metric(args, stats) -> float:
    """Model selection: novel AP50 (COCO OVD, percent) or APr (LVIS)."""
    return float(stats["APr"]) if args.dataset_file == "lvis" else float(stats[13])


def make_loaders(args, dataset_train, dataset_val, device: torch.device):
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
    pin = device.type == "cuda"  # page-locked batches copy to the GPU asynchronously
    loader_train = None
    if dataset_train is not None:
        batches = BatchSampler(sampler_train, args.batch_size, drop_last=True)
        if len(batches) == 0:
            raise ValueError(f"the training set ({len(dataset_train)} images) is smaller than one batch "
                             f"(--batch_size {args.batch_size} per process x {dist.get_world_size()} processes)")
        loader_train = DataLoader(dataset_train, batch_sampler=batches, collate_fn=collate_fn,
                                  num_workers=args.num_workers, pin_memory=pin)
    loader_val = DataLoader(dataset_val, args.batch_size, sampler=sampler_val, drop_last=False,
                            collate_fn=collate_fn, num_workers=args.num_workers, pin_memory=pin)
    return sampler_train, loader_train, loader_val


def check_args(args) -> None:
    """Flag combinations that cannot work, refused before anything is built."""
    if args.split_class_p > 0 and not args.anchor_pre_matching:
        raise ValueError(f"--split_class_p {args.split_class_p} needs --anchor_pre_matching: it splits the classes "
                         "the anchors are pre-matched to")
    if args.dataset_file == "lvis" and args.anchor_pre_matching and args.remove_misclassified and not args.label_map:
        raise ValueError("--dataset_file lvis with --remove_misclassified needs --label_map: without it LVIS labels "
                         "are raw category ids, which never equal the pre-matched class indices")
    if args.pseudo_box and args.eval:
        raise ValueError("--pseudo_box adds pseudo boxes to the training set; it has no effect with --eval")


def load_run_checkpoint(path: str, cfg: ModelConfig) -> dict:
    """The checkpoint to resume or evaluate, checked against this run's network flags."""
    checkpoint = load_checkpoint(path)
    weights = checkpoint.get("model")
    if not isinstance(weights, dict):
        raise CheckpointError(f"--resume {path}: no 'model' state dict (keys: {sorted(map(str, checkpoint))[:10]})")
    try:
        mismatches = cfg.checkpoint_mismatches(weights, checkpoint.get("args"))
    except KeyError as e:
        raise CheckpointError(f"--resume {path}: not a CORA state dict (no tensor {e})") from e
    if mismatches:
        raise CheckpointError(f"--resume {path} was trained with other network flags than this run's:\n  "
                              + "\n  ".join(mismatches)
                              + "\nPass the checkpoint's values (python tools/inspect_checkpoint.py shows them).")
    return checkpoint


class Localizer:
    """The training run's state: model (maybe DDP-wrapped), EMA, optimizer and schedule, best metric."""

    def __init__(self, args, cfg: ModelConfig, device: torch.device, checkpoint: dict | None, source: str):
        model, self.criterion, self.postprocessors = build_model(
            cfg, checkpoint_weights=checkpoint["model"] if checkpoint else None)
        model.to(device)
        if checkpoint is not None:
            load_detector_weights(model, checkpoint["model"], source=source)
        self.module = model
        self.model = model
        if args.distributed:
            self.model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index if device.index is not None else torch.cuda.current_device()]
                if device.type == "cuda" else None,
                # text_proj only works on pre-matched, text-conditioned queries
                find_unused_parameters=not (cfg.anchor_pre_matching and cfg.condition_on_text))
        self.ema = None
        if args.model_ema:
            # Copied after DDP has broadcast rank 0's weights. The original copies before wrapping, so with
            # seed + rank every rank's EMA starts from its own random initialisation and the evaluations
            # during training differ on the images of ranks other than 0 (checkpoints hold rank 0's EMA).
            self.ema = ModelEMA(self.module, args.model_ema_decay)
            ema_weights = checkpoint.get("model_ema") if checkpoint is not None else None
            if isinstance(ema_weights, dict):
                load_model_state(self.ema.module, ema_weights, strict=True, source=f"{source} ['model_ema']")
            elif checkpoint is not None:
                # Unlike the original (which would evaluate its freshly initialised EMA copy), an EMA
                # missing from the checkpoint starts from the checkpoint's model weights.
                print(f"{source} has no model_ema: the EMA starts from its model weights")
        self.optimizer, self.lr_scheduler = build_optimizer(self.module, lr=args.lr, weight_decay=args.weight_decay,
                                                            lr_drop=args.lr_drop)
        self.best_performance = 0.0
        self.args = args

    @property
    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def restore_training_state(self, checkpoint: dict) -> int | None:
        """Optimizer, schedule, best metric and random states of a training checkpoint; returns its epoch
        (None for a checkpoint without them, e.g. a published one: training then starts at epoch 0)."""
        if not all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
            return None
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        self.best_performance = checkpoint.get("best_performance", 0.0)
        if "rng_state" in checkpoint:
            set_rng_state(checkpoint["rng_state"])
        return int(checkpoint["epoch"])

    def snapshot(self, epoch: int, pending_log: dict | None = None, rng: dict | None = None) -> dict:
        """The original's checkpoint layout, plus the random states for an exact resume (`rng`: every rank's,
        from `util.rng.checkpoint_rng_state()`; default this process's) and, until the epoch's evaluation and
        log line are written, that log line's training part (`pending_log`)."""
        state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "lr_scheduler": self.lr_scheduler.state_dict(), "epoch": epoch, "args": self.args,
                 "best_performance": self.best_performance,
                 "model_ema": self.ema.state_dict() if self.ema is not None else -1,
                 "rng_state": rng if rng is not None else rng_state()}
        if pending_log is not None:
            state["pending_log"] = pending_log
        return state


def run_evaluation(args, run: Localizer, loader_val, dataset_val, device, output_dir, boost):
    evaluator = build_evaluator(args, dataset_val)
    test_stats, evaluator = evaluate(run.eval_model, run.criterion, run.postprocessors, loader_val, evaluator,
                                     device, categories=dataset_val.category_list, boost=boost,
                                     prune=not args.no_prune_eval)
    if dist.is_main_process() and output_dir:
        from util.atomic import write_json

        write_json(evaluator.results_json(), output_dir / "results_bbox.json")
        if hasattr(evaluator, "table"):
            print(evaluator.table(), flush=True)
    return test_stats, test_stats["coco_eval_bbox"], evaluator


def finish_epoch(args, run: Localizer, epoch: int, log_stats: dict, evaluate_now, output_dir: Path | None) -> None:
    """After an epoch's checkpoint.pth: evaluate (when due), keep the best checkpoint, write the log line."""
    if (epoch + 1) % args.eval_every_epoch == 0:
        # Evaluation draws random numbers too (the val resize's random.choice, loader seeds); it leaves
        # the states as it found them, so that a run resumed from checkpoint.pth continues identically.
        # (checkpoint_rng_state is a collective: gathered here, before any rank-0 branch)
        state, every_rank = rng_state(), checkpoint_rng_state()
        test_stats, stats, evaluator = evaluate_now()
        set_rng_state(state)
        log_stats = {**log_stats, **{f"test_{k}": v for k, v in test_stats.items()}}
        performance = best_metric(args, stats)
        if performance > run.best_performance:
            run.best_performance = performance
            if args.save_best and output_dir and dist.is_main_process():
                save_checkpoint(run.snapshot(epoch, rng=every_rank), output_dir / "checkpoint_best.pth")
        if output_dir and dist.is_main_process():
            (output_dir / "eval").mkdir(exist_ok=True)
            eval_state = evaluator.eval_state()
            save_checkpoint(eval_state, output_dir / "eval" / "latest.pth")
            save_checkpoint(eval_state, output_dir / "eval" / f"{epoch:04}.pth")
    append_log(output_dir, log_stats)


def warn_cut_names(classifier, *datasets) -> None:
    """Class names longer than the text encoder reads are cut, as the original cuts them; say so, once."""
    for dataset in datasets:
        if dataset is None:
            continue
        cut = classifier.truncated(dataset.category_list)
        if cut:
            print(f"warning: {len(cut)} of the {len(dataset.category_list)} class names of {dataset.ann_file} are "
                  f"cut to --text_len {classifier.text_len} tokens in some of the 80 prompt templates (as the "
                  f"original does): {cut[:10]}{' ...' if len(cut) > 10 else ''}", flush=True)


def main(args):
    if args.no_model_ema:
        args.model_ema = False
    check_args(args)
    output_dir = Path(args.output_dir) if args.output_dir else None
    device = start_run(args, output_dir)
    set_tf32(args.allow_tf32)  # models.inference.detect switches it off for evaluation and restores it
    cfg = ModelConfig.from_args(args)
    # The data first: a missing image or a json without boxes stops the run before the model is built.
    dataset_val = build_dataset("val", args)
    dataset_train = None if args.eval else build_dataset("train", args)
    boost = resolve_boost(cfg.target_class_factor, dataset_val.novel_indices if cfg.target_class_factor != 1 else None,
                          len(dataset_val.category_list), what=f"the val json {dataset_val.ann_file}")
    sampler_train, loader_train, loader_val = make_loaders(args, dataset_train, dataset_val, device)

    source = resume_path(args.resume, output_dir, auto=not args.no_auto_resume)
    checkpoint = load_run_checkpoint(source, cfg) if source else None
    # A full checkpoint holds every weight (CLIP included): no archive or region prompt is opened then.
    run = Localizer(args, cfg, device, checkpoint, source)
    n_parameters = sum(p.numel() for p in run.module.parameters() if p.requires_grad)
    print("Total number of params in model:", n_parameters)
    warn_cut_names(run.module.classifier, dataset_val, dataset_train)

    def evaluate_now():
        return run_evaluation(args, run, loader_val, dataset_val, device, output_dir, boost)

    if args.eval:
        test_stats, stats, evaluator = evaluate_now()
        if output_dir and dist.is_main_process():
            save_checkpoint(evaluator.eval_state(), output_dir / "eval.pth")
        # one line in log.txt as a training epoch writes it, naming the evaluated checkpoint instead of an epoch
        append_log(output_dir, {"eval": source, **{f"test_{k}": v for k, v in test_stats.items()}})
        return stats

    last_epoch = run.restore_training_state(checkpoint) if checkpoint is not None else None
    if last_epoch is not None:
        args.start_epoch = last_epoch + 1
        pending = checkpoint.get("pending_log")
        if pending is not None and last_epoch not in logged_epochs(output_dir):
            print(f"epoch {last_epoch} was saved but not evaluated and logged: finishing it first")
            finish_epoch(args, run, last_epoch, pending, evaluate_now, output_dir)
    del checkpoint

    print("Start training")
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        if hasattr(sampler_train, "set_epoch"):
            sampler_train.set_epoch(epoch)
        train_stats = train_one_epoch(run.model, run.criterion, loader_train, run.optimizer, device, epoch,
                                      categories=dataset_train.category_list, max_norm=args.clip_max_norm,
                                      model_ema=run.ema, split_class_p=args.split_class_p)
        run.lr_scheduler.step()
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch,
                     "n_parameters": n_parameters}
        rng = checkpoint_rng_state()  # every rank's generators (a collective: all ranks call it)
        if output_dir and dist.is_main_process():
            # Saved before the evaluation, which a kill may interrupt: the resumed run finishes it.
            save_checkpoint(run.snapshot(epoch, pending_log=log_stats, rng=rng), output_dir / "checkpoint.pth")
            if (epoch + 1) % args.save_every_epoch == 0:
                save_checkpoint(run.snapshot(epoch, rng=rng), output_dir / f"checkpoint{epoch:04}.pth")
        finish_epoch(args, run, epoch, log_stats, evaluate_now, output_dir)
    total = time.time() - start_time
    print(f"Training time {time.strftime('%H:%M:%S', time.gmtime(total))}")
    return None


if __name__ == "__main__":
    sys.exit(run_cli(main, get_args_parser().parse_args(), "main.py"))
