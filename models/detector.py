"""The CORA detector: frozen CLIP trunk, anchor pre-matching, DAB-DETR localizer, CLIP region scores."""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from models.backbone import Joiner
from models.clip import TextClassifier
from models.mlp import MLP
from models.prematch import NovelBoost, PrematchResult, prematch_anchors
from models.transformer import Transformer
from util.box_ops import inverse_sigmoid
from util.nested_tensor import NestedTensor, nested_tensor_from_tensor_list


class CORA(nn.Module):
    """Open-vocabulary detector (CVPR 2023). Submodule names give the original's state-dict keys.

    The network predicts boxes and one class-agnostic objectness logit per query, in training and
    at evaluation alike; how a trained model turns them into scored detections (CLIP's
    classification of the final boxes, the novel boost, post-processing) is `models.inference.detect`.
    """

    def __init__(self, *, backbone: Joiner, transformer: Transformer, classifier: TextClassifier,
                 num_queries: int = 1000, text_dim: int = 1024, condition_bottleneck: int = 128,
                 input_proj_groupnorm: bool = False, objectness_prior: bool = False,
                 anchor_pre_matching: bool = True, condition_on_text: bool = True):
        super().__init__()
        # Both off: DAB-DETR's class-agnostic queries (anchors in their own order, zero content queries,
        # matching without the class mask), the ablation of the paper's Table 3; region scores at eval
        # are unchanged. The original's defaults are off; its configs turn both on.
        self.anchor_pre_matching = anchor_pre_matching
        self.condition_on_text = condition_on_text
        hidden_dim = transformer.d_model
        num_dec = transformer.num_decoder_layers
        self.backbone = backbone
        self.transformer = transformer
        self.classifier = classifier
        self.query_embed = nn.Embedding(num_queries, 4)
        in_channels = backbone.trunk.num_channels[0]
        proj = [nn.Conv2d(in_channels, hidden_dim, kernel_size=1)]
        if input_proj_groupnorm:
            # The original adds GroupNorm when --epochs < 25 ("introduced by accident"); kept for its key layout.
            proj.append(nn.GroupNorm(32, hidden_dim))
        self.input_proj = nn.ModuleList([nn.Sequential(*proj)])
        box_head = MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.zeros_(box_head.layers[-1].weight)
        nn.init.zeros_(box_head.layers[-1].bias)
        self.bbox_embed = nn.ModuleList([copy.deepcopy(box_head) for _ in range(num_dec)])
        self.transformer.decoder.bbox_embed = self.bbox_embed
        self.objectness_embed = nn.Linear(hidden_dim, 1)
        if objectness_prior:
            nn.init.constant_(self.objectness_embed.bias, -math.log((1 - 0.01) / 0.01))
        self.text_proj = MLP(text_dim, condition_bottleneck, hidden_dim, 2)

    @staticmethod
    def _as_nested(samples) -> NestedTensor:
        if isinstance(samples, NestedTensor):
            return samples
        if isinstance(samples, (list, tuple)):
            return nested_tensor_from_tensor_list(list(samples))
        if torch.is_tensor(samples) and samples.ndim == 4:
            mask = torch.zeros(samples.shape[0], *samples.shape[-2:], dtype=torch.bool, device=samples.device)
            return NestedTensor(samples, mask)
        raise TypeError(f"samples: expected a NestedTensor, a [B,3,H,W] tensor or a list of [3,H,W] tensors, "
                        f"found {type(samples).__name__}")

    def forward(self, samples, categories: Sequence[str], *, split_class: bool = False,
                boost: NovelBoost | None = None) -> dict:
        """The network on `samples` (NestedTensor, `[B,3,H,W]` tensor or list of `[3,H,W]`) for `categories`.

        Returns, in training and at evaluation alike:
          `pred_logits [B',Q,1]` objectness logits and `pred_boxes [B',Q,4]` cxcywh in 0..1 of each
          unpadded image (final decoder layer); `aux_outputs`: the same for the earlier layers;
          `proposal_classes [B',Q]` pre-matched class per query (also in each aux dict; only with
          anchor pre-matching); `anchor_index [B',Q]` the query_embed row of each query;
          `text_features [C,D]` the categories' embeddings; `layer3` the trunk's stride-16 map (a
          NestedTensor `[B,E/2,h,w]`), which region scoring reads; `split_class` True on split iterations.
        With `split_class` (training) B' = 2B: the classes are split at random in two halves, one per
        batch copy. `boost` multiplies novel-class probabilities in pre-matching (evaluation's
        `--target_class_factor`, given by `models.inference.detect`).
        """
        samples = self._as_nested(samples)
        features, pos = self.backbone(samples)
        text = self.classifier(categories)
        matched = self._match_anchors(features["layer4"], text, samples.tensors.shape[0], split_class, boost)
        if self.condition_on_text and matched.classes is not None:
            content = self.text_proj(text)[matched.classes].transpose(0, 1)  # [Q,B',d]
        else:
            content = matched.refpoints.new_zeros(*matched.refpoints.shape[:2], self.transformer.d_model)
        layer3 = features["layer3"]
        src = self.input_proj[0](layer3.tensors)
        hs, references, _ = self.transformer(src, layer3.mask, matched.refpoints, pos, content)
        boxes = torch.stack([
            (head(h) + inverse_sigmoid(ref, eps=1e-5)).sigmoid()
            for head, h, ref in zip(self.bbox_embed, hs, references)
        ])
        objectness = self.objectness_embed(hs)  # one head shared by all layers
        classes = {} if matched.classes is None else {"proposal_classes": matched.classes}
        out = {
            "pred_logits": objectness[-1],
            "pred_boxes": boxes[-1],
            **classes,
            "anchor_index": matched.anchor_index,
            "aux_outputs": [{"pred_logits": o, "pred_boxes": b, **classes}
                            for o, b in zip(objectness[:-1], boxes[:-1])],
            "text_features": text,
            "layer3": layer3,
        }
        if split_class:
            out["split_class"] = True
        return out

    def _match_anchors(self, layer4: NestedTensor, text: torch.Tensor, batch: int, split_class: bool,
                       boost: NovelBoost | None) -> PrematchResult:
        """Anchor pre-matching, or (without it) the anchors in their own order as class-agnostic queries."""
        anchors = self.query_embed.weight
        if self.anchor_pre_matching:
            split_mask = torch.rand_like(text[:, 0]) > 0.5 if split_class else None
            return prematch_anchors(anchors, layer4, self.backbone.trunk.attn_pool, text, boost=boost,
                                    split_mask=split_mask)
        if split_class:
            raise ValueError("split_class splits the classes of anchor pre-matching, which is off")
        order = torch.arange(anchors.shape[0], device=anchors.device).expand(batch, -1)
        return PrematchResult(classes=None, anchor_index=order, refpoints=anchors[:, None].expand(-1, batch, -1))
