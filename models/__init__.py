"""`build_model(args) -> (model, criterion, postprocessors)`, the DETR-family entry point."""
from __future__ import annotations

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
    return model, criterion, build_postprocessors(args)
