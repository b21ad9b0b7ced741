"""The compact golden copy (tests/fixtures/golden) against the full golden folder, and usable on its own."""
import argparse
import glob
import hashlib
import json
import os
import re

import pytest
import torch

from tests import golden

SHARED_GOLDEN = os.path.join(golden.REPO_DIR, "..", "shared", "golden")
needs_shared = pytest.mark.skipif(
    not os.path.isdir(SHARED_GOLDEN),
    reason=f"no full golden folder at {os.path.normpath(SHARED_GOLDEN)} to compare the compact copy with",
)


def _load(file: str):
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(file, map_location="cpu", weights_only=True)


def assert_identical(actual, expected, where: str = ""):
    """Same structure, types and values; tensors of the same dtype, shape and values (NaN equal to NaN)."""
    assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
    if isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        same = torch.equal(actual, expected) or (
            expected.is_floating_point() and torch.equal(actual.isnan(), expected.isnan())
            and torch.equal(actual.nan_to_num(0.0), expected.nan_to_num(0.0)))
        assert same, f"{where}: values differ"
    elif isinstance(expected, dict):
        assert list(actual.keys()) == list(expected.keys()), where
        for key in expected:
            assert_identical(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_identical(a, e, f"{where}[{i}]")
    elif isinstance(expected, argparse.Namespace):
        assert_identical(vars(actual), vars(expected), where)
    elif isinstance(expected, float) and expected != expected:
        assert actual != actual, where
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def test_every_file_rebuilds_to_its_recorded_bytes():
    """Each file of the copy, verbatim or rebuilt, has the size and sha256 the manifest recorded from the
    full folder (runs without it)."""
    for name, entry in golden.manifest().items():
        file = golden.compact_path(name)
        with open(file, "rb") as f:
            data = f.read()
        assert len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"], name


def _names_the_tests_use() -> set[str]:
    """Golden names written in tests/*.py and tools/*.py: arguments of golden.path/load/load_json and string
    literals of golden files (`photos/…`), an f-string's fields as wildcards."""
    sources = glob.glob(os.path.join(golden.REPO_DIR, "tests", "*.py")) + \
        glob.glob(os.path.join(golden.REPO_DIR, "tools", "*.py"))
    call = re.compile(r"golden\.(?:path|load|load_json)\(\s*(f?)\"([^\"]+)\"")
    photo = re.compile(r"\"(photos/[^\"]+)\"")
    names = set()
    for source in sources:
        if os.path.basename(source) in {"golden.py", "test_golden_copy.py"}:
            continue
        with open(source) as f:
            text = f.read()
        names |= {(fmt, name) for fmt, name in call.findall(text)}
        names |= {("", name) for name in photo.findall(text)}
    return names


def test_copy_holds_every_golden_file_the_tests_name():
    held = set(golden.manifest())
    used = _names_the_tests_use()
    assert len(used) > 20
    for fmt, name in sorted(used):
        if fmt:
            pattern = re.compile(re.sub(r"\\\{[^}]*\\\}", ".+", re.escape(name)) + "$")
            assert any(pattern.match(n) for n in held), f"no golden file matches f\"{name}\""
        else:
            assert name in held, f"{name} is named by a test but missing from the compact copy"
    for name in held:
        if golden.manifest()[name]["stored"] == "verbatim":
            assert os.path.isfile(os.path.join(golden.COMPACT_DIR, name)), name
        else:
            assert os.path.isfile(os.path.join(golden.COMPACT_DIR, golden.manifest()[name]["stored"])), name


@needs_shared
def test_copy_holds_every_file_of_the_full_folder():
    full = set()
    for root, _, files in os.walk(SHARED_GOLDEN):
        for f in files:
            full.add(os.path.relpath(os.path.join(root, f), SHARED_GOLDEN).replace(os.sep, "/"))
    assert full - {"README.md"} == set(golden.manifest())
    with open(os.path.join(SHARED_GOLDEN, "README.md"), "rb") as a, \
            open(os.path.join(golden.COMPACT_DIR, "GOLDEN_README.md"), "rb") as b:
        assert a.read() == b.read(), "GOLDEN_README.md is not the full folder's README.md"
    reference = os.path.join(SHARED_GOLDEN, "..", "reference")
    for listing in glob.glob(os.path.join(reference, "state_dict_*.txt")):
        copy = os.path.join(os.path.dirname(golden.COMPACT_DIR), "reference", os.path.basename(listing))
        with open(listing, "rb") as a, open(copy, "rb") as b:
            assert a.read() == b.read(), copy


def _manifest_names() -> list[str]:
    """The copy's file names (its own MANIFEST.json, part of the repository), for parametrising."""
    try:
        return sorted(golden.manifest())
    except FileNotFoundError:
        return []


@needs_shared
@pytest.mark.parametrize("name", _manifest_names())
def test_copy_is_bit_identical_to_the_full_folder(name):
    """Byte for byte, and every value as the readers see it: torch.load of each .pth (keys, dtypes, values,
    argparse.Namespace), the CLIP archive's state dict through the project's reader, json documents."""
    full = os.path.join(SHARED_GOLDEN, name)
    copy = golden.compact_path(name)
    with open(full, "rb") as a, open(copy, "rb") as b:
        assert a.read() == b.read(), f"{name}: bytes differ"
    if name.endswith(".pth"):
        assert_identical(_load(copy), _load(full), name)
    elif name.endswith(".pt"):
        from util.torchscript_archive import read_state_dict

        assert_identical(read_state_dict(copy), read_state_dict(full), name)
    elif name.endswith(".json"):
        with open(full) as a, open(copy) as b:
            assert json.load(b) == json.load(a), name


def test_compact_checkpoint_loads_into_the_model():
    """On its own (whatever CORA_GOLDEN_DIR says): the model built from the copy's CLIP archive and region
    prompt takes the copy's checkpoint strictly, and its frozen CLIP tensors are the checkpoint's."""
    from models import build_model

    args = golden.model_args(model_path=golden.compact_path("clip_tiny.pt"),
                             region_prompt_path=golden.compact_path("region_prompt_tiny.pth"))
    model, _, _ = build_model(args)
    built = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint = _load(golden.compact_path("checkpoint_tiny.pth"))
    assert {"model", "model_ema", "optimizer", "lr_scheduler", "epoch", "args"} <= checkpoint.keys()
    for weights in ("model", "model_ema"):
        model.load_state_dict(checkpoint[weights], strict=True)
    frozen = [k for k, v in checkpoint["model"].items() if torch.equal(v, checkpoint["model_ema"][k])]
    assert len(frozen) > 100
    for key in frozen:
        expected = checkpoint["model"][key]
        assert built[key].dtype == expected.dtype and torch.equal(built[key], expected), key
