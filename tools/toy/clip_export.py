"""A CLIP ResNet with OpenAI's module tree and parameter names, and its export as an OpenAI TorchScript archive.

    python -c "from tools.toy.clip_export import *; export_archive(ToyCLIP(ToyCLIPConfig()), 'logs/random.pt')"

OpenAI ships CLIP as `torch.jit.save`d TorchScript (`RN50.pt`); the project reads such files with its
restricted reader (`models.clip.read_clip_archive`) and open_clip reads them with
`open_clip.load_openai_model`. `ToyCLIP` is OpenAI's `clip/model.py` CLIP: the image tower is
open_clip's ModifiedResNet (OpenAI's code, same names), the text blocks keep OpenAI's attribute
order (attn, ln_1, mlp, ln_2) so the state dict lists keys in OpenAI's order, and the three
integer buffers OpenAI's archives carry (`input_resolution`, `context_length`, `vocab_size`) are there.
`export_archive` applies OpenAI's fp16 conversion (conv / linear / attention weights and
`text_projection`; norms, positional embeddings and `logit_scale` stay fp32) and scripts the tree.
One deliberate difference: `token_embedding` is stored in fp16 too (OpenAI's is fp32), which halves the
archive; its shape [49408, width] is fixed by the tokenizer and dominates the file.
"""
from __future__ import annotations

import copy
import math
import os
import tempfile
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from torch import nn


@dataclass(frozen=True)
class ToyCLIPConfig:
    vision_layers: tuple[int, int, int, int] = (1, 1, 1, 1)
    vision_width: int = 16  # stem channels; layer4 has 32x as many
    attnpool_grid: int = 3  # S: images are 32*S px
    output_dim: int = 64
    text_width: int = 64  # heads = width / 64, as OpenAI's loader infers them
    text_layers: int = 2
    context_length: int = 77
    vocab_size: int = 49408  # open_clip's tokenizer, which the project uses

    @property
    def image_resolution(self) -> int:
        return 32 * self.attnpool_grid

    def to_dict(self) -> dict:
        return asdict(self)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """fp32 LayerNorm on any input dtype (OpenAI's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(d_model * 4, d_model)),
        ]))
        self.ln_2 = LayerNorm(d_model)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """`x [L, N, W]` (sequence first, as OpenAI's), `attn_mask [L, L]` additive."""
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask.to(y.dtype))[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class ToyCLIP(nn.Module):
    """OpenAI's CLIP (ModifiedResNet image tower), sized by `ToyCLIPConfig`, with OpenAI's initialisation."""

    def __init__(self, cfg: ToyCLIPConfig):
        super().__init__()
        if cfg.text_width % 64:
            raise ValueError(f"text_width {cfg.text_width}: must be a multiple of 64 (heads = width / 64)")
        self.context_length = cfg.context_length
        self.visual = ModifiedResNet(layers=list(cfg.vision_layers), output_dim=cfg.output_dim,
                                     heads=cfg.vision_width * 32 // 64, image_size=cfg.image_resolution,
                                     width=cfg.vision_width)
        self.transformer = Transformer(cfg.text_width, cfg.text_layers, cfg.text_width // 64)
        self.vocab_size = cfg.vocab_size
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.ln_final = LayerNorm(cfg.text_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.text_width, cfg.output_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.cfg = cfg
        self.register_buffer("attn_mask", torch.full((cfg.context_length, cfg.context_length), float("-inf")).triu_(1),
                             persistent=False)
        self._init_parameters(cfg)

    def _init_parameters(self, cfg: ToyCLIPConfig) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        pool = self.visual.attnpool
        std = pool.c_proj.in_features ** -0.5
        for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        for stage in (self.visual.layer1, self.visual.layer2, self.visual.layer3, self.visual.layer4):
            for name, param in stage.named_parameters():
                if name.endswith("bn3.weight"):
                    nn.init.zeros_(param)
        width, layers = cfg.text_width, cfg.text_layers
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """`[N, 3, R, R]` CLIP-normalised -> `[N, D]` (unnormalised)."""
        return self.visual(image)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """`[N, L]` token ids (L <= context_length, EOT = largest id) -> `[N, D]` (unnormalised).

        A causal model: positions after EOT never change its output, so L shorter than the
        context gives the same embedding as padding to 77 (and trains faster).
        """
        n, length = tokens.shape
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        x = self.transformer(x.permute(1, 0, 2), self.attn_mask[:length, :length]).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(n, device=x.device), tokens.argmax(dim=-1)] @ self.text_projection

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.encode_image(image), dim=-1), F.normalize(self.encode_text(tokens), dim=-1)


def convert_weights_openai(model: nn.Module, *, token_embedding_fp16: bool = True) -> None:
    """OpenAI's `convert_weights`: conv / linear / attention weights and `text_projection` to fp16."""
    def convert(layer: nn.Module) -> None:
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            layer.weight.data = layer.weight.data.half()
            if layer.bias is not None:
                layer.bias.data = layer.bias.data.half()
        if isinstance(layer, nn.MultiheadAttention):
            for attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                         "bias_k", "bias_v"):
                tensor = getattr(layer, attr, None)
                if tensor is not None:
                    tensor.data = tensor.data.half()
        if isinstance(layer, ToyCLIP):
            layer.text_projection.data = layer.text_projection.data.half()
            if token_embedding_fp16:
                layer.token_embedding.weight.data = layer.token_embedding.weight.data.half()

    model.apply(convert)


class _ArchiveRoot(nn.Module):
    """The scripted root: OpenAI's attribute order, so the state dict's key order is OpenAI's.

    Parameters first (positional_embedding, text_projection, logit_scale), then the int buffers,
    then visual, transformer, token_embedding, ln_final.
    """

    def __init__(self, model: ToyCLIP):
        super().__init__()
        self.positional_embedding = model.positional_embedding
        self.text_projection = model.text_projection
        self.logit_scale = model.logit_scale
        # OpenAI's archives carry these three as int64 scalars in the state dict (loaders drop them).
        self.register_buffer("input_resolution", torch.tensor(model.cfg.image_resolution))
        self.register_buffer("context_length", torch.tensor(model.context_length))
        self.register_buffer("vocab_size", torch.tensor(model.vocab_size))
        self.visual = model.visual
        self.transformer = model.transformer
        self.token_embedding = model.token_embedding
        self.ln_final = model.ln_final
        # a plain tensor attribute, as OpenAI's blocks hold their mask: in the archive, not in the state dict
        self.attn_mask = model.attn_mask.clone()

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image.to(self.visual.conv1.weight.dtype))

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        image_features = self.encode_image(image)
        x = self.token_embedding(tokens).to(self.positional_embedding.dtype) + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2), self.attn_mask).permute(1, 0, 2)
        x = self.ln_final(x)
        text = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ self.text_projection.to(x.dtype)
        image_features = F.normalize(image_features.float(), dim=-1)
        return self.logit_scale.exp() * image_features @ F.normalize(text.float(), dim=-1).t()


def export_archive(model: ToyCLIP, path: str | os.PathLike, *, token_embedding_fp16: bool = True) -> None:
    """Write `model` as an OpenAI-format TorchScript archive (`torch.jit.save` of the scripted tree)."""
    model = copy.deepcopy(model).cpu().eval()
    convert_weights_openai(model, token_embedding_fp16=token_embedding_fp16)
    root = _ArchiveRoot(model).eval()
    for p in root.parameters():
        p.requires_grad_(False)
    scripted = torch.jit.script(root)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # The archive's inner folder is named after the file (OpenAI's RN50.pt holds RN50/...): save under the
    # final name in a temporary folder, then move it into place (no half-written archive at `path`).
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as tmp:
        staged = os.path.join(tmp, os.path.basename(path))
        torch.jit.save(scripted, staged)
        os.replace(staged, path)


def load_state_into(model: ToyCLIP, state_dict: dict[str, torch.Tensor]) -> None:
    """Load an OpenAI-format state dict (e.g. read back from an archive) into a fp32 `ToyCLIP`."""
    sd = {k: v for k, v in state_dict.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "attn_mask"]
    if missing or unexpected:
        raise ValueError(f"state dict does not fit ToyCLIP: missing {missing}, unexpected {unexpected}")
