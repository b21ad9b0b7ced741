"""CLIP as CORA uses it: OpenAI-format archives, the frozen image trunk, and the text classifier.

The architecture is read from tensor shapes (as OpenAI's loader does), so `RN50.pt`, `RN50x4.pt`
and any miniature archive of the same layout build through one path. The image tower is
open_clip's ModifiedResNet with `FrozenBatchNorm2d`; the text side is the `classifier` module
whose state-dict keys are the original's (`classifier.positional_embedding`, ...).
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import LayerNorm, QuickGELU, Transformer
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from util.numerics import strict_fp32
from util.torchscript_archive import read_state_dict

CLIP_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "clip")
# The 80 ImageNet prompt templates of OpenAI's CLIP paper, in their published order.
PROMPT_TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
PROMPT_CHUNK = 3000  # prompts encoded per text-tower call, as the original


@dataclass(frozen=True)
class CLIPArchitecture:
    """Everything needed to build CORA's CLIP modules; read off a state dict's shapes."""

    vision_layers: tuple[int, ...]
    vision_width: int  # stem output channels (64 for RN50)
    output_dim: int  # D, the joint embedding size
    attnpool_grid: int  # S: the attention pool's positional embedding has S*S + 1 rows
    text_width: int
    text_layers: int
    context_length: int
    vocab_size: int

    @property
    def trunk_width(self) -> int:
        """E, channels of layer4 (layer3 has E // 2)."""
        return self.vision_width * 32

    @property
    def vision_heads(self) -> int:
        return self.vision_width * 32 // 64

    @property
    def text_heads(self) -> int:
        return self.text_width // 64

    @property
    def image_resolution(self) -> int:
        return self.attnpool_grid * 32


# The two backbones of the published configs, for building without an archive (random weights).
KNOWN_ARCHITECTURES = {
    "RN50": CLIPArchitecture((3, 4, 6, 3), 64, 1024, 7, 512, 12, 77, 49408),
    "RN50x4": CLIPArchitecture((4, 6, 10, 6), 80, 640, 9, 640, 12, 77, 49408),
}


def architecture_from_state_dict(state_dict: dict[str, torch.Tensor], source: str) -> CLIPArchitecture:
    """Read the architecture of an OpenAI-format CLIP state dict (`visual.*` + text keys)."""
    required = ["visual.layer1.0.conv1.weight", "visual.attnpool.positional_embedding",
                "visual.attnpool.c_proj.weight", "positional_embedding", "token_embedding.weight",
                "ln_final.weight"]
    missing = [k for k in required if k not in state_dict]
    if missing:
        vit = "visual.proj" in state_dict
        kind = "a ViT CLIP (CORA needs a ModifiedResNet: RN50, RN50x4, ...)" if vit else "not a CLIP ResNet archive"
        raise ValueError(f"{source}: {kind}; missing keys {missing}")
    layers = tuple(
        len({k.split(".")[2] for k in state_dict if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4)
    )
    pe_rows = state_dict["visual.attnpool.positional_embedding"].shape[0]
    grid = round(math.sqrt(pe_rows - 1))
    if grid * grid + 1 != pe_rows:
        raise ValueError(f"{source}: visual.attnpool.positional_embedding has {pe_rows} rows, expected S*S+1")
    return CLIPArchitecture(
        vision_layers=layers,
        vision_width=state_dict["visual.layer1.0.conv1.weight"].shape[0],
        output_dim=state_dict["visual.attnpool.c_proj.weight"].shape[0],
        attnpool_grid=grid,
        text_width=state_dict["ln_final.weight"].shape[0],
        text_layers=len({k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks.")}),
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
    )


# Where CLIP's tensors sit inside a CORA state dict (the original's key layout, SPEC §9): the trunk under
# `backbone.0.body.` (layer4 also aliased as `backbone.0.layer4.`), the attention pool (region prompt)
# under `backbone.0.attn_pool.`, the text tower under `classifier.`.
DETECTOR_CLIP_PREFIXES = ("backbone.0.", "classifier.")
TEXT_KEYS = ("transformer.", "token_embedding.", "ln_final.", "positional_embedding", "text_projection")


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


def has_clip_weights(weights: dict[str, torch.Tensor]) -> bool:
    """Whether a CORA state dict holds the CLIP trunk and text tower (a full checkpoint)."""
    return any(k.startswith("backbone.0.body.") for k in weights) and any(k.startswith("classifier.") for k in weights)


def clip_model_name(backbone: str) -> str:
    """`clip_RN50` -> `RN50` (the original's `--backbone` values)."""
    if not backbone.startswith("clip_"):
        raise ValueError(f"--backbone {backbone!r}: CORA needs a CLIP ResNet, e.g. clip_RN50 or clip_RN50x4")
    return backbone[len("clip_"):]


def resolve_archive_path(backbone: str, model_path: str = "") -> str:
    """Where the CLIP archive is: `--model_path`, else `~/.cache/clip/<name>.pt` (OpenAI's cache)."""
    name = clip_model_name(backbone)
    path = model_path or os.path.join(CLIP_CACHE_DIR, f"{name}.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"CLIP archive for --backbone {backbone} not found at {path}. CORA needs OpenAI's {name}.pt "
            f"(the TorchScript file OpenAI's `clip` package downloads to {CLIP_CACHE_DIR}/{name}.pt). "
            f"Put it there or pass --model_path /path/to/{name}.pt. "
            f"(With --resume on a full CORA checkpoint no archive is needed.)"
        )
    return path


def read_clip_archive(path: str) -> tuple[CLIPArchitecture, dict[str, torch.Tensor]]:
    state_dict = read_state_dict(path)
    return architecture_from_state_dict(state_dict, source=path), state_dict


def load_region_prompt(path: str, arch: CLIPArchitecture) -> dict[str, torch.Tensor]:
    """A region-prompt file: `{'attnpool.positional_embedding': [S*S+1, E]}` (ModifiedResNet keys).

    Every key overrides the CLIP weight of the same name, as the original's `dict.update` does.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--region_prompt_path {path}: file not found. It is the output of region prompting "
            f"(tools/region_prompt.py), a dict {{'attnpool.positional_embedding': tensor "
            f"[{arch.attnpool_grid ** 2 + 1}, {arch.trunk_width}]}}."
        )
    try:
        prompt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--region_prompt_path {path}: cannot be read as a tensor dict ({e})") from e
    expected = {"attnpool.positional_embedding": (arch.attnpool_grid ** 2 + 1, arch.trunk_width)}
    if not isinstance(prompt, dict) or not prompt:
        raise ValueError(f"--region_prompt_path {path}: expected a non-empty dict of tensors, "
                         f"found {type(prompt).__name__}")
    for key, value in prompt.items():
        if key not in expected:
            raise ValueError(
                f"--region_prompt_path {path}: unexpected key {key!r}; region prompts hold {sorted(expected)}"
            )
        if not torch.is_tensor(value) or tuple(value.shape) != expected[key]:
            found = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"--region_prompt_path {path}: {key} has shape {found}, expected {expected[key]}")
    return prompt


def build_visual(arch: CLIPArchitecture) -> ModifiedResNet:
    """open_clip's ModifiedResNet with every BatchNorm frozen (buffers, eps 1e-5), parameters frozen."""
    visual = ModifiedResNet(
        layers=list(arch.vision_layers), output_dim=arch.output_dim, heads=arch.vision_heads,
        image_size=arch.image_resolution, width=arch.vision_width,
    )
    _freeze_batchnorm(visual)
    for p in visual.parameters():
        p.requires_grad_(False)
    return visual


def _freeze_batchnorm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child.num_features, eps=child.eps))
        else:
            _freeze_batchnorm(child)


def visual_state_dict(clip_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("visual."):]: v for k, v in clip_state_dict.items() if k.startswith("visual.")}


def attention_pool(attnpool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """CLIP's attention pooling of `[N,E,S,S]` maps -> `[N,D]`: the mean token queries all S*S+1 tokens.

    Only the mean token's output is used, so only its query row is computed.
    """
    n, e, h, w = x.shape
    tokens = x.flatten(2).permute(0, 2, 1)  # [N,S*S,E]
    tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
    tokens = tokens + attnpool.positional_embedding[None].to(tokens.dtype)
    q = F.linear(tokens[:, :1], attnpool.q_proj.weight, attnpool.q_proj.bias)
    k = F.linear(tokens, attnpool.k_proj.weight, attnpool.k_proj.bias)
    v = F.linear(tokens, attnpool.v_proj.weight, attnpool.v_proj.bias)
    out = multi_head_pool(q, k, v, attnpool.num_heads)
    return F.linear(out[:, 0], attnpool.c_proj.weight, attnpool.c_proj.bias)


def multi_head_pool(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Softmax attention `q [N,Lq,E]`, `k,v [N,Lk,E]` -> `[N,Lq,E]`, heads split along E, q scaled by 1/sqrt(E/h)."""
    n, lq, e = q.shape
    head_dim = e // num_heads
    q = q.reshape(n, lq, num_heads, head_dim).transpose(1, 2) * head_dim ** -0.5
    k = k.reshape(n, -1, num_heads, head_dim).transpose(1, 2)
    v = v.reshape(n, -1, num_heads, head_dim).transpose(1, 2)
    attn = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
    return (attn @ v).transpose(1, 2).reshape(n, lq, e)


class TextClassifier(nn.Module):
    """CLIP's text tower turned into a classifier of category names (SPEC §3.5).

    A name's embedding is the L2-normalised mean of the L2-normalised embeddings of the 80
    prompt templates, encoded with the first `text_len` positions of the context. Embeddings are
    frozen, so each name is encoded once and cached (`cache`: name -> `[D]` on the CPU; entries are
    added, never replaced; `models.text_cache` fills it from disk). Per vocabulary (the tuple of names a
    forward gets) the stacked `[C, D]` tensor is kept on the module's device and returned again by later
    forwards (training, evaluation, the EMA copy), so a forward copies nothing to the GPU; the last
    `VOCABULARIES_KEPT` vocabularies are kept. None of this is part of the state dict; loading weights
    clears both caches, moving the module (`.to`, `.cuda`, ...) the stacked tensors.
    """

    VOCABULARIES_KEPT = 4

    def __init__(self, arch: CLIPArchitecture, *, text_len: int = 77,
                 projection_dtype: torch.dtype = torch.float16, positional_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not 2 <= text_len <= arch.context_length:
            raise ValueError(f"--text_len {text_len}: must be between 2 and the CLIP context length "
                             f"{arch.context_length}")
        self.text_len = text_len
        # Registration order = the original's state-dict order; the two tensors below keep the
        # archive's dtypes (the original assigns them with `.data =`).
        self.positional_embedding = nn.Parameter(
            torch.empty(arch.context_length, arch.text_width, dtype=positional_dtype), requires_grad=False)
        self.text_projection = nn.Parameter(
            torch.empty(arch.text_width, arch.output_dim, dtype=projection_dtype), requires_grad=False)
        self.transformer = Transformer(
            width=arch.text_width, layers=arch.text_layers, heads=arch.text_heads,
            act_layer=QuickGELU, norm_layer=LayerNorm, batch_first=True,
        )
        self.token_embedding = nn.Embedding(arch.vocab_size, arch.text_width)
        self.ln_final = LayerNorm(arch.text_width)
        self.register_buffer("attn_mask", self._causal_mask(text_len), persistent=False)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=arch.text_width ** -0.5)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        for p in self.parameters():
            p.requires_grad_(False)
        self.cache: dict[str, torch.Tensor] = {}
        self._stacked: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()  # vocabulary -> [C, D], on device
        self._tokenizer = SimpleTokenizer()
        self._prompt_tokens: dict[str, int] = {}  # name -> tokens of its longest prompt (SOT, EOT included)
        self._template_overhead: int | None = None

    @staticmethod
    def _causal_mask(n: int) -> torch.Tensor:
        return torch.full((n, n), float("-inf")).triu_(1)

    def load_clip_weights(self, clip_state_dict: dict[str, torch.Tensor]) -> None:
        """Copy the text tower from an OpenAI-format state dict; the two `.data =` tensors keep their dtype."""
        text = {k: v for k, v in clip_state_dict.items()
                if k.startswith(("transformer.", "token_embedding.", "ln_final."))}
        self.positional_embedding.data = clip_state_dict["positional_embedding"].clone()
        self.text_projection.data = clip_state_dict["text_projection"].clone()
        text["positional_embedding"] = self.positional_embedding.data
        text["text_projection"] = self.text_projection.data
        self.load_state_dict(text, strict=True)
        self.cache.clear()
        self._stacked.clear()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Loading new weights (a checkpoint's classifier) invalidates cached embeddings.
        self.cache.clear()
        self._stacked.clear()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() ...: the stacked vocabularies are rebuilt on the module's new device
        self._stacked.clear()
        return super()._apply(fn, *args, **kwargs)

    def prompt_length(self, name: str) -> int:
        """Tokens of the name's longest prompt among the 80 templates, start and end tokens included."""
        if name not in self._prompt_tokens:
            self._prompt_tokens[name] = 2 + max(len(self._tokenizer.encode(t.format(name))) for t in PROMPT_TEMPLATES)
        return self._prompt_tokens[name]

    def truncated(self, names: Sequence[str]) -> list[str]:
        """The names some of whose prompts are longer than `text_len` tokens: the tokenizer cuts them (as
        the original does), and two long names can come out with the same embedding."""
        if self._template_overhead is None:  # tokens a template adds around a one-token name
            self._template_overhead = max(len(self._tokenizer.encode(t.format("x"))) for t in PROMPT_TEMPLATES) - 1

        def may_be_cut(name: str) -> bool:
            # punctuation at the name's ends can merge with the template's into other tokens: a margin per mark
            margin = 1 + sum(not (c.isalnum() or c.isspace()) for c in name)
            return 2 + len(self._tokenizer.encode(name)) + self._template_overhead + margin > self.text_len

        return [n for n in dict.fromkeys(names) if may_be_cut(n) and self.prompt_length(n) > self.text_len]

    def indistinguishable(self, names: Sequence[str]) -> list[list[str]]:
        """Groups of names whose every prompt is cut to the same tokens: the classifier cannot tell them apart."""
        groups: dict[tuple, list[str]] = {}
        for name in self.truncated(names):
            key = tuple(map(tuple, self.tokenize([t.format(name) for t in PROMPT_TEMPLATES]).tolist()))
            groups.setdefault(key, []).append(name)
        return [g for g in groups.values() if len(g) > 1]

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP BPE, `[N, text_len]`; longer prompts are cut and end with EOT (OpenAI's truncate=True)."""
        return self._tokenizer(list(texts), context_length=self.text_len)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """`[N, text_len]` token ids -> `[N, D]` (unnormalised) text embeddings."""
        x = self.token_embedding(tokens)
        x = x + self.positional_embedding[: self.text_len].to(x.dtype)
        x = self.transformer(x, attn_mask=self.attn_mask)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return x @ self.text_projection.to(x.dtype)

    @torch.no_grad()
    @strict_fp32()  # cached and reused by evaluation: never TF32, whatever training allows (util/numerics.py)
    def embed_names(self, names: Sequence[str]) -> torch.Tensor:
        """`[C, D]` prompt-ensemble embeddings of `names`, computed without the cache (in full fp32)."""
        device = self.token_embedding.weight.device
        prompts = [t.format(name) for name in names for t in PROMPT_TEMPLATES]
        tokens = self.tokenize(prompts).to(device)
        feats = torch.cat([self.encode_text(chunk) for chunk in tokens.split(PROMPT_CHUNK)])
        feats = F.normalize(feats, dim=-1).reshape(len(names), len(PROMPT_TEMPLATES), -1).mean(dim=1)
        return F.normalize(feats, dim=-1)

    def forward(self, categories: Sequence[str]) -> torch.Tensor:
        """Category names -> `[C, D]` L2-normalised text embeddings on the module's device."""
        if len(categories) == 0:
            raise ValueError("categories: got an empty list; the detector needs at least one class name")
        vocabulary = tuple(categories)
        device = self.token_embedding.weight.device
        stacked = self._stacked.get(vocabulary)
        # (one made under torch.inference_mode cannot enter autograd outside it: made again there)
        if stacked is not None and stacked.device == device and (torch.is_inference_mode_enabled()
                                                                  or not stacked.is_inference()):
            self._stacked.move_to_end(vocabulary)
            return stacked
        new = list(dict.fromkeys(c for c in categories if c not in self.cache))
        if new:
            self.cache.update(zip(new, self.embed_names(new).cpu()))  # one copy to the host
        stacked = torch.stack([self.cache[c] for c in vocabulary]).to(device)
        self._stacked[vocabulary] = stacked
        while len(self._stacked) > self.VOCABULARIES_KEPT:
            self._stacked.popitem(last=False)
        return stacked


def build_text_classifier(arch: CLIPArchitecture, text_len: int,
                          clip_state_dict: dict[str, torch.Tensor] | None = None) -> TextClassifier:
    if clip_state_dict is None:
        return TextClassifier(arch, text_len=text_len)
    classifier = TextClassifier(
        arch, text_len=text_len,
        projection_dtype=clip_state_dict["text_projection"].dtype,
        positional_dtype=clip_state_dict["positional_embedding"].dtype,
    )
    classifier.load_clip_weights(clip_state_dict)
    return classifier
