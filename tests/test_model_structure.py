"""State-dict layout of the full RN50 / RN50x4 models = the published checkpoints' (tests/fixtures/reference)."""
import os

import pytest

from main import get_args_parser
from models import ModelConfig, build_cora
from models.clip import KNOWN_ARCHITECTURES
from tests import golden

# Copies of ../shared/reference/state_dict_RN50*.txt (the published checkpoints' key listings), so that a
# clone tests itself; tests/test_golden_copy.py checks them against the shared folder when it is there.
REFERENCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "reference")


def config_argv() -> list[str]:
    """The original config's flags: config.json's argv without the miniature model's extra flags."""
    config = golden.load_json("config.json")
    return config["argv"][: -len(config["extra_flags"])]


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


def _assert_same_layout(actual, expected):
    """Same keys with the same shape, dtype, kind, trainability and aliasing; the trainable keys in the
    same order (optimizer states are stored by position). open_clip registers a text block's `ln_1`
    before `attn`, so the frozen classifier keys come in another order, which loading ignores."""
    got = {row[0]: row for row in actual}
    want = {row[0]: row for row in expected}
    assert got.keys() == want.keys(), (sorted(got.keys() - want.keys())[:10], sorted(want.keys() - got.keys())[:10])
    for key in want:
        assert got[key] == want[key], f"{got[key]} != {want[key]}"
    assert [r[0] for r in actual if r[4]] == [r[0] for r in expected if r[4]]
    assert [r[0] for r in actual if not r[0].startswith("classifier.")] == \
        [r[0] for r in expected if not r[0].startswith("classifier.")]


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
    args = get_args_parser().parse_args(config_argv() + extra)
    model = build_cora(ModelConfig.from_args(args), KNOWN_ARCHITECTURES[name])
    expected = read_listing(os.path.join(REFERENCE_DIR, f"state_dict_{name}.txt"))
    _assert_same_layout(describe(model), expected)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_trainable == {"RN50": 12_088_388, "RN50x4": 12_104_772}[name]


def test_tiny_model_matches_golden_listing():
    from models import build_model

    model, _, _ = build_model(golden.model_args())
    expected = read_listing(golden.path("state_dict_tiny.txt"))
    _assert_same_layout(describe(model), expected)
