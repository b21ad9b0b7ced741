"""State-dict layout of the full RN50 / RN50x4 models = the published checkpoints' (../shared/reference)."""
import os

import pytest
import torch

from main import get_args_parser
from models import build_cora
from models.clip import KNOWN_ARCHITECTURES
from tests import golden

REFERENCE_DIR = os.path.join(os.path.dirname(golden.GOLDEN_DIR), "reference")
CONFIG_ARGV = golden.load_json("config.json")["argv"][: -len(golden.load_json("config.json")["extra_flags"])]


def read_listing(path):
    rows = []
    with open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            key, shape, dtype, kind, trainable, alias = line.rstrip("\n").split("\t")
            shape = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
            rows.append((key, shape, dtype, kind, trainable == "T", None if alias == "-" else alias))
    return rows


def describe(model):
    params = {id(p) for p in model.parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    first_name = {}
    rows = []
    for key, t in model.state_dict(keep_vars=True).items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        alias = first_name.setdefault(ident, key)
        rows.append((key, tuple(t.shape), str(t.dtype).replace("torch.", ""),
                     "param" if id(t) in params else "buffer", id(t) in trainable,
                     None if alias == key else alias))
    return rows


@pytest.mark.parametrize("name,extra", [("RN50", []), ("RN50x4", ["--backbone", "clip_RN50x4", "--text_dim", "640"])])
def test_state_dict_matches_reference_listing(name, extra):
    args = get_args_parser().parse_args(CONFIG_ARGV + extra)
    model = build_cora(args, KNOWN_ARCHITECTURES[name])
    expected = read_listing(os.path.join(REFERENCE_DIR, f"state_dict_{name}.txt"))
    actual = describe(model)
    assert [r[0] for r in actual] == [r[0] for r in expected]
    for got, want in zip(actual, expected):
        assert got == want, f"{got} != {want}"
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_trainable == {"RN50": 12_088_388, "RN50x4": 12_104_772}[name]


def test_tiny_model_matches_golden_listing():
    from models import build_model

    model, _, _ = build_model(golden.model_args())
    expected = read_listing(golden.path("state_dict_tiny.txt"))
    assert describe(model) == expected
