"""How a trained CORA detects: the evaluation policy, in one function (SPEC §3.11, §6.1).

    from models.inference import detect
    detected = detect(model, samples, categories, postprocess=PostProcess(max_detections=100, use_nms=True),
                      target_sizes=sizes, boost=resolve_boost(8.0, novel_indices, len(categories)))
    detected.results    # per image: scores [K], labels [K] (into categories), boxes [K,4] xyxy pixels, query_index [K]

`CORA.forward` computes the network: CLIP features, anchor pre-matching (with the novel boost when
one is given), the decoder's boxes and objectness. `detect` adds what evaluation does with them: CLIP
classifies each final box (`models.region_head`: RoIAlign on layer3 -> layer4 -> attention pool),
a query's score for class c is `softmax_c(100 * [cos(box, text_1..C), 0]) * sigmoid(objectness)`, and
`PostProcess` keeps the top detections. Region scoring is pruned exactly (`models.pruned_eval`): only
the queries that can still change this PostProcess's detections are CLIP-scored, with the same
detections and scores as scoring all of them (`prune=False`).

`engine.evaluate`, `models.predictor.Predictor` (and through it the demo and the web page) and
`tools/pseudo_label.py` detect through this function; nothing sets evaluation policy on the model.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from models.detector import CORA
from models.postprocess import PostProcess
from models.prematch import NovelBoost
from models.pruned_eval import PruneSpec, pruned_detection_logits
from util.numerics import strict_fp32

EVAL_TAU = 100.0  # softmax temperature of the region classification (the original's --eval_tau default)


@dataclass
class Detected:
    """`outputs`: `CORA.forward`'s dict plus `class_logits [B,Q,C]` (inverse-sigmoid scores; queries
    pruning left unscored hold `models.pruned_eval.FILL_LOGIT`) and `scored_queries [B,Q]` bool.
    `results`: PostProcess's per-image dicts."""

    outputs: dict
    results: list[dict]


def unwrap(model: nn.Module) -> CORA:
    """The CORA module inside a DistributedDataParallel wrapper (evaluation needs no gradient sync)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
@strict_fp32()  # full fp32 (no TF32) whatever training used: util/numerics.py
def detect(model: nn.Module, samples, categories: Sequence[str], *, postprocess: PostProcess,
           target_sizes: torch.Tensor, boost: NovelBoost | None = None, prune: bool = True) -> Detected:
    """Detect `categories` in `samples` (NestedTensor, `[B,3,H,W]` or list of `[3,H,W]`) with a model in
    eval mode. target_sizes `[B,2]` = (h, w) of the frame the boxes are returned in (original image
    pixels). boost: the novel boost of pre-matching (`models.prematch.resolve_boost`). prune: score
    only the queries that can change the detections (same detections either way)."""
    model = unwrap(model)
    if model.training:
        raise RuntimeError("detect: the model is in training mode; call model.eval() first")
    outputs = model(samples, categories, boost=boost)
    # scores and boxes in fp32 even where an autocast region (the Predictor's opt-in bf16) computed them
    outputs["pred_logits"], outputs["pred_boxes"] = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
    spec = PruneSpec.for_postprocess(postprocess, prune=prune)
    class_logits, scored = pruned_detection_logits(
        model.backbone.trunk, outputs["layer3"], outputs["pred_boxes"], outputs["text_features"],
        outputs["pred_logits"], tau=EVAL_TAU, spec=spec)
    results = postprocess({"pred_logits": class_logits, "pred_boxes": outputs["pred_boxes"]}, target_sizes)
    return Detected(outputs={**outputs, "class_logits": class_logits, "scored_queries": scored}, results=results)
