"""`build_model(args) -> (model, criterion, postprocessors)`, the DETR-family entry point."""
from __future__ import annotations

import argparse

import torch

from models.backbone import build_backbone
from models.clip import (
    CLIPArchitecture,
    architecture_from_state_dict,
    build_text_classifier,
    build_visual,
    load_region_prompt,
    read_clip_archive,
    resolve_archive_path,
    visual_state_dict,
)
from models.criterion import build_criterion
from models.detector import CORA
from models.matcher import build_matcher
from models.postprocess import build_postprocessors
from models.pruned_eval import PruneSpec
from models.transformer import build_transformer


def clip_state_dict_from_detector(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CORA state dict's CLIP tensors under OpenAI's names (`visual.*`, text keys)."""
    out = {}
    for key, value in weights.items():
        if key.startswith("backbone.0.body."):
            out["visual." + key[len("backbone.0.body."):]] = value
        elif key.startswith("backbone.0.attn_pool."):
            out["visual.attnpool." + key[len("backbone.0.attn_pool."):]] = value
        elif key.startswith("classifier."):
            out[key[len("classifier."):]] = value
    return out


MODEL_ARGS = ("backbone", "text_len", "pe_temperature", "enc_layers", "dec_layers", "dim_feedforward", "hidden_dim",
              "dropout", "nheads", "num_queries", "text_dim", "condition_bottleneck", "anchor_pre_matching",
              "condition_on_text", "disable_init", "target_class_factor", "aux_loss", "remove_misclassified",
              "set_cost_class", "set_cost_bbox", "set_cost_giou", "cls_loss_coef", "bbox_loss_coef",
              "giou_loss_coef", "focal_alpha", "use_nms", "no_nms", "dataset_file", "epochs")


def args_for_weights(weights: dict[str, torch.Tensor], stored=None):
    """Arguments that build the model of a CORA state dict: main.py's defaults, then the checkpoint's
    stored `args` (an argparse.Namespace, if any), then what the tensors' shapes imply."""
    from main import get_args_parser

    # the published method where the checkpoint does not say (a bare state dict): both are on in its configs
    args = get_args_parser().parse_args(["--anchor_pre_matching", "--condition_on_text"])
    stored = vars(stored or argparse.Namespace())
    # only what defines the model; the stored run's device and paths (e.g. 'cuda') are not this run's
    for key in MODEL_ARGS:
        if key in stored:
            setattr(args, key, stored[key])
    arch = architecture_from_state_dict(clip_state_dict_from_detector(weights), source="checkpoint")
    args.text_dim = arch.output_dim
    args.num_queries = weights["query_embed.weight"].shape[0]
    args.enc_layers = len({k.split(".")[3] for k in weights if k.startswith("transformer.encoder.layers.")})
    args.dec_layers = len({k.split(".")[3] for k in weights if k.startswith("transformer.decoder.layers.")})
    args.dim_feedforward = weights["transformer.encoder.layers.0.linear1.weight"].shape[0]
    args.hidden_dim = weights["transformer.decoder.norm.weight"].shape[0]
    args.condition_bottleneck = weights["text_proj.layers.0.weight"].shape[0]
    args.epochs = 1 if any(k.startswith("input_proj.0.1.") for k in weights) else max(args.epochs, 25)
    return args


def build_cora(args, arch: CLIPArchitecture, clip_state_dict: dict[str, torch.Tensor] | None = None,
               region_prompt: dict[str, torch.Tensor] | None = None) -> CORA:
    """The detector for a CLIP architecture; CLIP weights from `clip_state_dict` (OpenAI names) if given,
    else random (the layout of the published configs, e.g. to check a checkpoint's keys)."""
    if args.text_dim != arch.output_dim:
        raise ValueError(f"--text_dim {args.text_dim} does not match the CLIP embedding size {arch.output_dim} "
                         f"of --backbone {args.backbone}")
    visual = build_visual(arch)
    if clip_state_dict is not None:
        weights = visual_state_dict(clip_state_dict)
        weights.update(region_prompt or {})
        visual.load_state_dict(weights, strict=True)
    classifier = build_text_classifier(arch, args.text_len, clip_state_dict)
    return CORA(
        backbone=build_backbone(visual, pe_temperature=args.pe_temperature, hidden_dim=args.hidden_dim),
        transformer=build_transformer(args),
        classifier=classifier,
        num_queries=args.num_queries,
        text_dim=args.text_dim,
        condition_bottleneck=args.condition_bottleneck,
        input_proj_groupnorm=args.epochs < 25,
        objectness_prior=not args.disable_init,
        target_class_factor=args.target_class_factor,
        anchor_pre_matching=args.anchor_pre_matching,
        condition_on_text=args.condition_on_text,
    )


def build_model(args, checkpoint_weights: dict[str, torch.Tensor] | None = None):
    """Returns `(model, criterion, postprocessors)`.

    CLIP comes from the archive (`--model_path` or `~/.cache/clip/<name>.pt`) plus the region
    prompt file; when `checkpoint_weights` (a full CORA state dict, e.g. from `--resume`) are given,
    the architecture is read from them and neither file is opened: the checkpoint holds every weight.
    """
    if checkpoint_weights is not None:
        clip_sd = clip_state_dict_from_detector(checkpoint_weights)
        arch = architecture_from_state_dict(clip_sd, source="checkpoint")
        prompt = None  # the checkpoint's attention pool already holds the region prompt
    else:
        arch, clip_sd = read_clip_archive(resolve_archive_path(args.backbone, args.model_path))
        prompt = load_region_prompt(args.region_prompt_path, arch) if args.region_prompt_path else None
    model = build_cora(args, arch, clip_sd, prompt)
    criterion = build_criterion(args, build_matcher(args))
    postprocessors = build_postprocessors(args)
    model.prune_eval = PruneSpec.for_postprocess(postprocessors["bbox"], prune=not args.no_prune_eval)
    return model, criterion, postprocessors
