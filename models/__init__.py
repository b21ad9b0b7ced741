"""`build_model(cfg) -> (model, criterion, postprocessors)`, the DETR-family entry point."""
from __future__ import annotations

import argparse

import torch

from models.backbone import build_backbone
from models.clip import (
    DETECTOR_CLIP_PREFIXES,
    CLIPArchitecture,
    architecture_from_state_dict,
    build_text_classifier,
    build_visual,
    clip_state_dict_from_detector,
    has_clip_weights,
    load_region_prompt,
    read_clip_archive,
    resolve_archive_path,
    visual_state_dict,
)
from models.config import ModelConfig
from models.criterion import build_criterion
from models.detector import CORA
from models.matcher import build_matcher
from models.postprocess import build_postprocessors
from models.transformer import build_transformer
from util.checkpoint import CheckpointError, load_model_state

__all__ = ["ModelConfig", "build_cora", "build_model", "load_detector_weights"]


def build_cora(cfg: ModelConfig, arch: CLIPArchitecture, clip_state_dict: dict[str, torch.Tensor] | None = None,
               region_prompt: dict[str, torch.Tensor] | None = None) -> CORA:
    """The detector for a CLIP architecture; CLIP weights from `clip_state_dict` (OpenAI names) if given,
    else random (the layout of the published configs, e.g. to check a checkpoint's keys)."""
    if cfg.text_dim != arch.output_dim:
        raise ValueError(f"--text_dim {cfg.text_dim} does not match the CLIP embedding size {arch.output_dim} "
                         f"of --backbone {cfg.backbone}")
    visual = build_visual(arch)
    if clip_state_dict is not None:
        weights = visual_state_dict(clip_state_dict)
        weights.update(region_prompt or {})
        visual.load_state_dict(weights, strict=True)
    classifier = build_text_classifier(arch, cfg.text_len, clip_state_dict)
    return CORA(
        backbone=build_backbone(visual, pe_temperature=cfg.pe_temperature, hidden_dim=cfg.hidden_dim),
        transformer=build_transformer(cfg),
        classifier=classifier,
        num_queries=cfg.num_queries,
        text_dim=cfg.text_dim,
        condition_bottleneck=cfg.condition_bottleneck,
        input_proj_groupnorm=cfg.input_proj_groupnorm,
        objectness_prior=cfg.objectness_prior,
        anchor_pre_matching=cfg.anchor_pre_matching,
        condition_on_text=cfg.condition_on_text,
    )


def build_model(cfg: ModelConfig | argparse.Namespace, checkpoint_weights: dict[str, torch.Tensor] | None = None):
    """Returns `(model, criterion, postprocessors)` for a `ModelConfig` (or main.py's parsed args, read
    through `ModelConfig.from_args`).

    CLIP comes from the archive (`cfg.model_path` or `~/.cache/clip/<name>.pt`) plus the region
    prompt file; when `checkpoint_weights` (a full CORA state dict, e.g. from `--resume`) hold the CLIP
    tensors, the architecture is read from them and neither file is opened: the checkpoint holds every
    weight. The weights themselves are not loaded here (`util.checkpoint.load_model_state`).
    """
    if not isinstance(cfg, ModelConfig):
        cfg = ModelConfig.from_args(cfg)
    if checkpoint_weights is not None and has_clip_weights(checkpoint_weights):
        clip_sd = clip_state_dict_from_detector(checkpoint_weights)
        arch = architecture_from_state_dict(clip_sd, source="checkpoint")
        prompt = None  # the checkpoint's attention pool already holds the region prompt
    else:
        arch, clip_sd = read_clip_archive(resolve_archive_path(cfg.backbone, cfg.model_path))
        prompt = load_region_prompt(cfg.region_prompt_path, arch) if cfg.region_prompt_path else None
    model = build_cora(cfg, arch, clip_sd, prompt)
    criterion = build_criterion(cfg, build_matcher(cfg))
    postprocessors = build_postprocessors(cfg)
    return model, criterion, postprocessors


def load_detector_weights(model: CORA, weights: dict[str, torch.Tensor], *, source: str) -> None:
    """Load a CORA state dict built by `build_model(cfg, checkpoint_weights=weights)`: strictly when it holds
    CLIP's tensors; a detector-only one (no CLIP, e.g. the bundled toy model) must hold every tensor but
    CLIP's, which came from the archive when the model was built."""
    if has_clip_weights(weights):
        load_model_state(model, weights, strict=True, source=source)
        return
    own = model.state_dict()
    unexpected = [k for k in weights if k not in own]
    missing = [k for k in own if k not in weights and not k.startswith(DETECTOR_CLIP_PREFIXES)]
    if unexpected or missing:
        raise CheckpointError(f"{source} does not fit the model built from it: missing {missing[:10]}, "
                              f"unexpected {unexpected[:10]}")
    load_model_state(model, weights, strict=False, source=source)
