"""Read-only access to the golden files: the original implementation's outputs (see ../shared/golden/README.md).

Two sources, the same bytes:

* `CORA_GOLDEN_DIR` (environment) set: that folder, a full golden set such as `../shared/golden`.
* unset: the compact copy in the repository, `tests/fixtures/golden/` (see its README.md). Small files
  lie there as they are; the large archives are stored as compact pieces and rebuilt, byte for byte
  (sha256 checked), into a cache folder the first time a test asks for them.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import tempfile
import zipfile

import numpy as np
import pytest
import torch

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPACT_DIR = os.path.join(REPO_DIR, "tests", "fixtures", "golden")
MANIFEST_NAME = "MANIFEST.json"

if os.environ.get("CORA_GOLDEN_DIR"):
    GOLDEN_DIR = os.path.abspath(os.environ["CORA_GOLDEN_DIR"])
else:
    GOLDEN_DIR = COMPACT_DIR
USING_COMPACT_COPY = GOLDEN_DIR == COMPACT_DIR

_cache: dict[str, object] = {}


def path(name: str) -> str:
    """A real file holding golden file `name` (relative to the golden folder, e.g. 'photos/coffee.png')."""
    if not USING_COMPACT_COPY:
        p = os.path.join(GOLDEN_DIR, name)
        if not os.path.exists(p):
            pytest.fail(f"golden file missing: {p} (CORA_GOLDEN_DIR names a full golden folder such as "
                        f"../shared/golden; unset it to use the compact copy in {COMPACT_DIR})")
        return p
    try:
        return compact_path(name)
    except KeyError:
        pytest.fail(f"golden file {name!r} is not in the compact copy {COMPACT_DIR} (rebuild it with "
                    f"`python tests/fixtures/build_golden_copy.py ../shared/golden`, or set CORA_GOLDEN_DIR)")


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


# ----------------------------------------------------------------------------- the compact copy


@functools.cache
def manifest() -> dict:
    """The compact copy's MANIFEST.json: per golden file `size`, `sha256` and `stored` ('verbatim' or the
    name of its compact file)."""
    with open(os.path.join(COMPACT_DIR, MANIFEST_NAME)) as f:
        return json.load(f)["files"]


def cache_dir() -> str:
    """Where rebuilt files go: CORA_GOLDEN_CACHE, else a per-user folder in the system's temporary folder."""
    if os.environ.get("CORA_GOLDEN_CACHE"):
        return os.environ["CORA_GOLDEN_CACHE"]
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return os.path.join(tempfile.gettempdir(), f"cora-golden-{user}")


@functools.cache
def compact_path(name: str) -> str:
    """A file with the bytes of golden file `name`, from the compact copy whatever CORA_GOLDEN_DIR says.
    Raises KeyError for a name the copy does not hold."""
    entry = manifest()[name]
    if entry["stored"] == "verbatim":
        return os.path.join(COMPACT_DIR, name)
    target = os.path.join(cache_dir(), entry["sha256"][:16], name)
    if os.path.exists(target) and _file_sha256(target) == entry["sha256"]:
        return target
    data = compact_bytes(name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    # Write a private temporary file and rename it into place: a parallel process sees no file or the
    # whole file, never a half one (os.replace is atomic within a file system).
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".partial-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o444)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return target


def compact_bytes(name: str, _archives: dict | None = None) -> bytes:
    """The exact bytes of golden file `name`, rebuilt from the compact copy; sha256 and size checked."""
    entry = manifest()[name]
    if entry["stored"] == "verbatim":
        with open(os.path.join(COMPACT_DIR, name), "rb") as f:
            data = f.read()
    else:
        packed = torch.load(os.path.join(COMPACT_DIR, entry["stored"]), map_location="cpu", weights_only=True)
        if packed.get("format") != 1:
            raise RuntimeError(f"{entry['stored']}: unknown compact format {packed.get('format')!r}")
        blob = packed["blob"].numpy()
        archives = {} if _archives is None else _archives
        data = b"".join(decode_piece(piece, blob, archives) for piece in packed["pieces"])
    if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise RuntimeError(f"compact golden copy: {name} does not rebuild to its recorded sha256 "
                           f"(rebuild the copy with tests/fixtures/build_golden_copy.py)")
    return data


def decode_piece(piece: dict, blob: np.ndarray, archives: dict) -> bytes:
    """One piece of a compact file (see tests/fixtures/golden/README.md, 'Format'):
    `bytes` (a slice of the blob), `planes` (an array of `count` elements of `width` bytes stored byte plane
    by byte plane, an all-zero plane not stored), `table` (chunks of `chunk` bytes picked by index from a
    table of distinct chunks), `ref` (a zip member of a golden file listed before it in the manifest,
    optionally cast from one floating dtype to another). `archives` caches the referenced files."""
    op = piece["op"]
    if op == "bytes":
        return blob[piece["start"]:piece["start"] + piece["length"]].tobytes()
    if op == "planes":
        out = np.zeros((piece["count"], piece["width"]), dtype=np.uint8)
        for i, start in enumerate(piece["planes"]):
            if start is not None:
                out[:, i] = blob[start:start + piece["count"]]
        return out.tobytes()
    if op == "table":
        table = np.frombuffer(decode_piece(piece["table"], blob, archives), dtype=np.uint8)
        index = np.frombuffer(decode_piece(piece["index"], blob, archives), dtype=np.dtype(piece["index_dtype"]))
        return table.reshape(-1, piece["chunk"])[index].tobytes()
    if op == "ref":
        if piece["file"] not in archives:
            archives[piece["file"]] = zipfile.ZipFile(io.BytesIO(compact_bytes(piece["file"], archives)))
        data = archives[piece["file"]].read(piece["member"])
        if piece.get("cast"):
            source, target = (getattr(torch, n) for n in piece["cast"])
            data = torch.frombuffer(bytearray(data), dtype=source).to(target).view(torch.uint8).numpy().tobytes()
        return data
    raise RuntimeError(f"unknown compact piece {op!r}")


def _file_sha256(file: str) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
