"""Read-only access to ../shared/golden, the original implementation's outputs (see its README)."""
from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

GOLDEN_DIR = os.environ.get(
    "CORA_GOLDEN_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "golden"),
)
GOLDEN_DIR = os.path.abspath(GOLDEN_DIR)

_cache: dict[str, object] = {}


def path(name: str) -> str:
    p = os.path.join(GOLDEN_DIR, name)
    if not os.path.exists(p):
        pytest.fail(f"golden file missing: {p} (set CORA_GOLDEN_DIR to the shared/golden folder)")
    return p


def load(name: str):
    """torch.load a golden file (weights_only, argparse.Namespace allowed), cached per session."""
    if name not in _cache:
        with torch.serialization.safe_globals([argparse.Namespace]):
            _cache[name] = torch.load(path(name), map_location="cpu", weights_only=True)
    return _cache[name]


def load_json(name: str):
    with open(path(name)) as f:
        return json.load(f)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel_of_max: float = 1e-4, atol: float = 1e-5,
                     what: str = ""):
    """max |a - e| <= rel_of_max * max|e| + atol (the README's rule for intermediates)."""
    actual = actual.detach().float().cpu()
    expected = expected.detach().float().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bound = rel_of_max * expected.abs().max().item() + atol
    diff = (actual - expected).abs().max().item()
    assert diff <= bound, f"{what}: max abs diff {diff:.3g} > {bound:.3g}"


def model_args(**overrides) -> argparse.Namespace:
    """The miniature model's arguments: the original's argv (config.json) through our parser,
    with the CLIP archive and region prompt pointing at the golden files."""
    from main import get_args_parser

    argv = list(load_json("config.json")["argv"])
    args = get_args_parser().parse_args(argv)
    args.model_path = path("clip_tiny.pt")
    args.region_prompt_path = path("region_prompt_tiny.pth")
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def per_anchor(values: torch.Tensor, anchor_index: torch.Tensor) -> torch.Tensor:
    """Reorder `[B,Q,...]` query-position values to anchor order (row i = anchor i), per image."""
    order = anchor_index.argsort(dim=1)
    return torch.stack([v[o] for v, o in zip(values, order)])
