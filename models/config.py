"""The model's configuration, typed: what `build_model` builds, from a parser's args or a checkpoint.

`ModelConfig` is a frozen dataclass without torch: `from_args` reads main.py's parsed flags (every
field from a flag that must exist: a flag read but not defined fails here, at start), and
`from_checkpoint` rebuilds it from a CORA state dict and the `args` Namespace the run stored, for
checkpoints of this project, of the original code, or bare state dicts. Checkpoints keep storing
the run's full `argparse.Namespace` (the original's format); this class is what the model reads.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The original adds GroupNorm to input_proj when --epochs < 25 (SPEC §3.4); only that decision is kept.
GROUPNORM_EPOCHS = 25
# PostProcess keeps 100 detections per image on COCO, 300 on LVIS (SPEC §6.1).
MAX_DETECTIONS = {"coco": 100, "lvis": 300}


# Fields that change the network's computation: a checkpoint must be run with its own values.
NETWORK_FIELDS = ("backbone", "text_len", "pe_temperature", "enc_layers", "dec_layers", "dim_feedforward", "hidden_dim",
                  "nheads", "num_queries", "text_dim", "condition_bottleneck", "anchor_pre_matching",
                  "condition_on_text", "input_proj_groupnorm")


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines the detector, its training losses and its post-processing.

    Defaults are main.py's flag defaults (tests/test_config.py checks that they agree).
    """

    # CLIP and where its weights come from (not read when a full checkpoint supplies every weight)
    backbone: str = "clip_RN50"
    model_path: str = ""
    region_prompt_path: str = ""
    text_len: int = 77
    pe_temperature: int = 20
    # localizer
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    hidden_dim: int = 256
    dropout: float = 0.1
    nheads: int = 8
    num_queries: int = 300
    text_dim: int = 1024
    condition_bottleneck: int = 128
    anchor_pre_matching: bool = False
    condition_on_text: bool = False
    objectness_prior: bool = True  # not --disable_init
    input_proj_groupnorm: bool = False  # --epochs < 25
    aux_loss: bool = True
    # matching and losses
    remove_misclassified: bool = False
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    matcher_backend: str = "auto"
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    focal_alpha: float = 0.25
    # evaluation
    use_nms: bool = False  # --use_nms and not --no_nms
    max_detections: int = 100  # by --dataset_file
    target_class_factor: float = 1.0
    prune_eval: bool = True  # not --no_prune_eval

    @classmethod
    def from_args(cls, args: Any) -> ModelConfig:
        """From main.py's parsed flags. Every flag must be present (AttributeError otherwise)."""
        return cls(**_values_from_flags(args, partial=False))

    @classmethod
    def from_checkpoint(cls, weights: Mapping[str, Any], stored_args: Any = None, **overrides: Any) -> ModelConfig:
        """The configuration of a CORA state dict: the published method's settings (anchor
        pre-matching and text-conditioned queries on, as in its configs) and main.py's defaults,
        then the flags the checkpoint's `args` (argparse.Namespace) stored, then what the tensors'
        shapes say (sizes always win over stored flags). Keys whose tensors are absent (a
        detector-only checkpoint's CLIP) are taken from `overrides` or the stored flags."""
        values = dataclasses.asdict(cls(anchor_pre_matching=True, condition_on_text=True))
        if stored_args is not None:
            values.update(_values_from_flags(stored_args, partial=True))
        values.update(_values_from_shapes(weights))
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def checkpoint_mismatches(self, weights: Mapping[str, Any], stored_args: Any = None) -> list[str]:
        """How this configuration's network differs from a checkpoint's (its tensors' shapes, and the
        flags its `args` stored): one line per differing flag, empty when they agree. Settings that
        only change training or post-processing (losses, --target_class_factor, --use_nms) may differ."""
        known = _values_from_shapes(weights)
        if stored_args is not None:
            stored = _values_from_flags(stored_args, partial=True)
            known.update({k: v for k, v in stored.items() if k not in known})
        lines = []
        for name in NETWORK_FIELDS:
            if name in known and known[name] != getattr(self, name):
                if name == "input_proj_groupnorm":
                    lines.append(f"--epochs: the checkpoint's input_proj {'has' if known[name] else 'has no'} "
                                 f"GroupNorm (the original adds one when --epochs < {GROUPNORM_EPOCHS}), this "
                                 f"run's {'has' if self.input_proj_groupnorm else 'has none'}")
                else:
                    lines.append(f"--{name}: checkpoint {known[name]!r}, this run {getattr(self, name)!r}")
        return lines


def _values_from_flags(args: Any, *, partial: bool) -> dict[str, Any]:
    """Field values from a Namespace of main.py flags; `partial` skips flags the Namespace lacks
    (checkpoints of the original code or of older versions store fewer flags)."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    derived = {
        "objectness_prior": (("disable_init",), lambda a: not a.disable_init),
        "input_proj_groupnorm": (("epochs",), lambda a: a.epochs < GROUPNORM_EPOCHS),
        "use_nms": (("use_nms", "no_nms"), lambda a: bool(a.use_nms and not a.no_nms)),
        "max_detections": (("dataset_file",), lambda a: _max_detections(a.dataset_file)),
        "prune_eval": (("no_prune_eval",), lambda a: not a.no_prune_eval),
    }
    values: dict[str, Any] = {}
    for name in sorted(names):
        flags, read = derived.get(name, ((name,), lambda a, n=name: getattr(a, n)))
        if partial and not all(hasattr(args, flag) for flag in flags):
            continue
        values[name] = read(args)
    return values


def _max_detections(dataset_file: str) -> int:
    if dataset_file not in MAX_DETECTIONS:
        raise ValueError(f"--dataset_file {dataset_file!r}: expected one of {sorted(MAX_DETECTIONS)}")
    return MAX_DETECTIONS[dataset_file]


def _layer_count(weights: Mapping[str, Any], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in weights if k.startswith(prefix)})


def _values_from_shapes(weights: Mapping[str, Any]) -> dict[str, Any]:
    """Sizes a CORA state dict fixes by its tensors' shapes (KeyError names a tensor it lacks)."""
    values = {
        "num_queries": weights["query_embed.weight"].shape[0],
        "enc_layers": _layer_count(weights, "transformer.encoder.layers."),
        "dec_layers": _layer_count(weights, "transformer.decoder.layers."),
        "dim_feedforward": weights["transformer.encoder.layers.0.linear1.weight"].shape[0],
        "hidden_dim": weights["transformer.decoder.norm.weight"].shape[0],
        "condition_bottleneck": weights["text_proj.layers.0.weight"].shape[0],
        "text_dim": weights["text_proj.layers.0.weight"].shape[1],
        "input_proj_groupnorm": any(k.startswith("input_proj.0.1.") for k in weights),
    }
    return values
