"""util/torchscript_archive.py and util/checkpoint.py: weights read without running code, atomic saves,
and errors that name the file, the refused global, or the offending keys."""
from __future__ import annotations

import argparse
import importlib.util
import io
import logging
import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from tests import golden
from util import torchscript_archive
from util.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_state,
    pick_weights,
    save_checkpoint,
)
from util.torchscript_archive import (
    ArchiveError,
    parse_class_declarations,
    read_state_dict,
    sha256_of,
)

# torch deprecates TorchScript; the reference here still is what OpenAI's loader and open_clip call.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.(load|script)` is deprecated:FutureWarning")


def _jit_state_dict(path) -> dict[str, torch.Tensor]:
    """The reference: what OpenAI's loader and open_clip do (runs the archive's code; trusted test files only)."""
    return torch.jit.load(str(path), map_location="cpu").state_dict()


def _bits(t: torch.Tensor) -> torch.Tensor:
    # Compare raw bytes, so fp16 values (and any NaN payload) must be identical, not merely close.
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _assert_same_state(ours: dict, theirs: dict) -> None:
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype, key
        assert ours[key].shape == value.shape, key
        assert torch.equal(_bits(ours[key]), _bits(value)), key


@pytest.fixture
def allow_jit():
    """Requested by the tests that call torch.jit.load on purpose (trusted, locally made files)."""


@pytest.fixture(autouse=True)
def _no_untrusted_jit_load(monkeypatch, request):
    """torch.jit.load runs code from the file: outside the tests that mean it, calling it is a failure."""
    if "allow_jit" in request.fixturenames:
        return

    def refuse(*args, **kwargs):
        raise AssertionError(f"torch.jit.load called on {args[:1]}")

    monkeypatch.setattr(torch.jit, "load", refuse)



# ------------------------------------------------------------------------------------------------------------
# TorchScript archives
# ------------------------------------------------------------------------------------------------------------


def test_golden_archive_equals_torch_jit_load(allow_jit):
    path = golden.path("clip_tiny.pt")
    ours = read_state_dict(path)
    theirs = _jit_state_dict(path)
    _assert_same_state(ours, theirs)
    # The OpenAI layout: fp16 and fp32 tensors side by side, and the int64 scalars that are buffers.
    assert {v.dtype for v in ours.values()} == {torch.float16, torch.float32, torch.int64}
    assert ours["context_length"].shape == () and int(ours["context_length"]) == 77
    assert int(ours["vocab_size"]) == 49408
    assert ours["visual.layer1.0.bn1.num_batches_tracked"].dtype == torch.int64


class _Block(nn.Module):
    """Like OpenAI's ResidualAttentionBlock: a causal mask kept as a plain tensor attribute."""

    def __init__(self, width: int, mask: torch.Tensor):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.c_fc = nn.Linear(width, width)
        self.attn_mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_fc(self.ln_1(x)) + self.attn_mask.sum()


class _OpenAILike(nn.Module):
    def __init__(self):
        super().__init__()
        width = 8
        mask = torch.full((4, 4), float("-inf")).triu_(1)
        self.positional_embedding = nn.Parameter(torch.randn(4, width))
        self.text_projection = nn.Parameter(torch.randn(width, width).t().half())  # fp16, transposed strides
        base = torch.arange(20.0)
        self.first = nn.Parameter(base[:4])  # two parameters on one storage, the second at offset 4
        self.second = nn.Parameter(base[4:10].view(2, 3))
        self.conv = nn.Conv2d(3, width, 3, bias=False)  # bias None: not in the state dict
        self.bn = nn.BatchNorm2d(width)
        self.resblocks = nn.Sequential(*[_Block(width, mask) for _ in range(2)])
        self.ln_final = self.resblocks[0].ln_1  # one module under two names: both keys listed
        self.register_buffer("input_resolution", torch.tensor(224))
        self.plain = torch.arange(3)  # a plain tensor attribute: not in the state dict

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x)).mean() + self.first.sum() + self.second.sum() + self.plain.sum()
        return self.resblocks(t + self.positional_embedding) + self.ln_final(t) + y + self.input_resolution


@pytest.fixture(scope="module")
def openai_like_archive(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("archive") / "openai_like.pt"
    torch.jit.script(_OpenAILike().eval()).save(str(path))
    return path


def test_reader_is_general_and_keeps_shared_storages(openai_like_archive, allow_jit):
    ours = read_state_dict(openai_like_archive)
    _assert_same_state(ours, _jit_state_dict(openai_like_archive))
    assert "input_resolution" in ours and "conv.bias" not in ours
    assert not any("attn_mask" in k or k == "plain" for k in ours)
    assert ours["ln_final.weight"].data_ptr() == ours["resblocks.0.ln_1.weight"].data_ptr()
    # views of one storage come back as views: same offset and strides as torch gives them
    assert ours["second"].storage_offset() == 4
    assert ours["second"].untyped_storage().data_ptr() == ours["first"].untyped_storage().data_ptr()
    assert ours["text_projection"].dtype == torch.float16 and ours["text_projection"].stride() == (1, 8)


def test_class_declarations_are_read_from_code_as_text():
    source = (
        "op_version_set = 1\n"
        "import __torch__.torch.nn.modules.linear\n"
        "class Outer(Module):\n"
        "  __parameters__ = [\"weight\", ]\n"
        "  __buffers__ = [\"running_mean\", \"count\", ]\n"
        "  weight : Tensor\n"
        "  attn_mask : Tensor\n"
        "  __annotations__[\"0\"] = __torch__.x.Inner\n"
        "  def forward(self: __torch__.x.Outer,\n"
        "    x: Tensor) -> Tensor:\n"
        "    __parameters__ = [\"not_a_declaration\"]\n"
        "    return x\n"
        "class Plain:\n"
        "  value : int\n"
        "def helper(x: Tensor) -> Tensor:\n"
        "  return x\n"
    )
    classes = parse_class_declarations(source, "__torch__.x", "code/__torch__/x.py")
    assert set(classes) == {"__torch__.x.Outer", "__torch__.x.Plain"}
    outer = classes["__torch__.x.Outer"]
    assert outer.is_module and outer.parameters == ["weight"] and outer.buffers == ["running_mean", "count"]
    assert not classes["__torch__.x.Plain"].is_module


# ------------------------------------------------------------------------------------------------------------
# Refusing archives that would run code
# ------------------------------------------------------------------------------------------------------------


class _RunsCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Evals:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w')",))


def _torchscript_like_zip(path: Path, data_pkl: bytes) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", data_pkl)
        z.writestr("evil/code/__torch__.py", "class M(Module):\n  __parameters__ = []\n  __buffers__ = []\n")
        z.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("evil/version", "3\n")


def test_archive_referencing_os_system_is_refused(tmp_path):
    marker = tmp_path / "pwned_system"
    archive = tmp_path / "evil_system.pt"
    _torchscript_like_zip(archive, pickle.dumps(_RunsCommand(marker), protocol=2))
    with pytest.raises(ArchiveError) as error:
        read_state_dict(archive)
    message = str(error.value)
    assert str(archive) in message and "refused" in message
    assert re.search(r"\b(os|posix)\.system\b", message), message
    assert not marker.exists()
    assert isinstance(error.value, pickle.UnpicklingError) and isinstance(error.value, ValueError)


def test_archive_with_eval_nested_in_a_module_is_refused(tmp_path):
    """The payload hides in a module attribute, after legitimate records: still refused, never run."""
    marker = tmp_path / "pwned_eval"
    archive = tmp_path / "evil_eval.pt"
    # Hand-assembled like torch's pickler writes a module: GLOBAL class, NEWOBJ, {attributes}, BUILD.
    payload = pickle.dumps(_Evals(marker), protocol=2)[2:-1]  # the REDUCE record without PROTO/STOP
    data_pkl = (b"\x80\x02c__torch__\nM\n)\x81}(X\x08\x00\x00\x00trainingq\x00\x88X\x04\x00\x00\x00evil"
                + payload + b"ub.")
    _torchscript_like_zip(archive, data_pkl)
    with pytest.raises(ArchiveError, match=r"(__builtin__|builtins)\.eval") as error:
        read_state_dict(archive)
    assert str(archive) in str(error.value)
    assert not marker.exists()


def test_non_torchscript_zip_goes_through_weights_only(tmp_path):
    """A zip without code/ is read as a torch.save file, i.e. by torch's weights_only unpickler."""
    marker = tmp_path / "pwned_plain"
    path = tmp_path / "evil_state.pt"
    torch.save({"visual.proj": _RunsCommand(marker)}, path)
    with pytest.raises(ArchiveError, match="refused") as error:
        read_state_dict(path)
    assert str(path) in str(error.value) and "system" in str(error.value)
    assert not marker.exists()


def test_plain_state_dicts_are_accepted(tmp_path):
    weights = {"module.visual.proj": torch.arange(6.0).view(2, 3), "module.logit_scale": torch.tensor(1.5).half()}
    path = tmp_path / "open_clip_style.pt"
    torch.save({"state_dict": weights, "epoch": 3}, path)
    ours = read_state_dict(path)
    assert list(ours) == ["visual.proj", "logit_scale"]
    assert torch.equal(ours["visual.proj"], weights["module.visual.proj"])
    assert ours["logit_scale"].dtype == torch.float16
    not_weights = tmp_path / "not_weights.pt"
    torch.save({"epoch": 3, "lr": 1e-4}, not_weights)
    with pytest.raises(ArchiveError, match="dict of tensors"):
        read_state_dict(not_weights)


def test_missing_archive_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "RN50.pt"))):
        read_state_dict(tmp_path / "RN50.pt")


def test_corrupt_storage_record_is_named(tmp_path):
    """A storage whose size disagrees with data.pkl: an error naming it, not a crash or garbage."""
    source = zipfile.ZipFile(golden.path("clip_tiny.pt"))
    broken = tmp_path / "broken.pt"
    with zipfile.ZipFile(broken, "w") as z:
        for info in source.infolist():
            data = source.read(info)
            z.writestr(info, data[:-2] if info.filename == "RN50/data/1" else data)
    with pytest.raises(ArchiveError, match=r"storage data/1 has 8190 bytes"):
        read_state_dict(broken)


# ------------------------------------------------------------------------------------------------------------
# The torch.jit.load fallback, for OpenAI's own files only
# ------------------------------------------------------------------------------------------------------------


def _reader_fails(monkeypatch):
    def fail(path):
        raise ArchiveError(f"{path}: simulated reader failure")

    monkeypatch.setattr(torchscript_archive, "read_torchscript_state_dict", fail)


def test_fallback_to_jit_only_for_a_published_openai_hash(monkeypatch, caplog, allow_jit):
    path = golden.path("clip_tiny.pt")
    _reader_fails(monkeypatch)
    monkeypatch.setitem(torchscript_archive.OPENAI_CLIP_SHA256, sha256_of(path), "RN50.pt")
    with caplog.at_level(logging.WARNING, logger="util.torchscript_archive"):
        ours = read_state_dict(path)
    _assert_same_state(ours, _jit_state_dict(path))
    assert "torch.jit.load" in caplog.text and "RN50.pt" in caplog.text


def test_no_fallback_for_an_unknown_file(monkeypatch):
    """Same failure, but the file is not one of OpenAI's: the error stands and torch.jit.load is never called."""
    _reader_fails(monkeypatch)
    with pytest.raises(ArchiveError, match="simulated reader failure"):
        read_state_dict(golden.path("clip_tiny.pt"))


def test_published_hashes_match_open_clip():
    """The hard-coded table agrees with the download URLs open_clip lists (read as text, not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        pytest.skip("open_clip is not installed")
    source = Path(spec.origin).with_name("pretrained.py").read_text()
    urls = {name: digest for digest, name in re.findall(r"/clip/models/([0-9a-f]{64})/([\w.-]+\.pt)", source)}
    assert {"RN50.pt", "RN50x4.pt"} <= set(urls), "open_clip no longer lists OpenAI's RN50/RN50x4 URLs"
    for digest, name in torchscript_archive.OPENAI_CLIP_SHA256.items():
        if name in urls:
            assert urls[name] == digest, name
    assert urls["RN50.pt"] in torchscript_archive.OPENAI_CLIP_SHA256
    assert urls["RN50x4.pt"] in torchscript_archive.OPENAI_CLIP_SHA256


# ------------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------------


class _CreatesFile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned_checkpoint"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "epoch": _CreatesFile(marker)}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert str(path) in message and "not loaded" in message and "run code" in message
    assert "io.open" in message or "builtins.open" in message  # torch's reason: the refused global
    assert "\x1b[" not in message
    assert not marker.exists()


def test_golden_checkpoint_loads_and_picks_ema():
    checkpoint = load_checkpoint(golden.path("checkpoint_tiny.pth"))
    assert isinstance(checkpoint["args"], argparse.Namespace) and checkpoint["args"].device == "cuda"
    assert pick_weights(checkpoint, use_ema=True) is checkpoint["model_ema"]
    assert pick_weights(checkpoint, use_ema=False) is checkpoint["model"]
    assert pick_weights(checkpoint, True) is not pick_weights(checkpoint, False)


def test_pick_weights_fallbacks_and_errors():
    model = {"a": torch.zeros(1)}
    assert pick_weights({"model": model, "model_ema": -1}, use_ema=True) is model  # the original's placeholder
    assert pick_weights({"model": model}, use_ema=True) is model
    bare = {"layer.weight": torch.zeros(2), "layer.bias": torch.zeros(2)}
    assert pick_weights(bare, use_ema=True) is bare
    with pytest.raises(CheckpointError, match=r"no 'model'.*epoch, optimizer"):
        pick_weights({"epoch": 1, "optimizer": {}}, use_ema=False, source="ckpt.pth")
    with pytest.raises(CheckpointError, match="ckpt.pth"):
        pick_weights({"epoch": 1}, use_ema=True, source="ckpt.pth")


def test_missing_or_unreadable_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "no_such_checkpoint.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_checkpoint(missing)
    truncated = tmp_path / "truncated.pth"
    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.ones(1000)}}, buffer)
    truncated.write_bytes(buffer.getvalue()[:500])
    with pytest.raises(CheckpointError, match=re.escape(str(truncated)) + ".*cannot be read"):
        load_checkpoint(truncated)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1e-4), "epoch": 3}, path)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["args"].lr == 1e-4 and torch.equal(loaded["model"]["w"], torch.ones(2))
    before = path.read_bytes()

    for failure in (OSError("disk full"), KeyboardInterrupt()):
        def crash(obj, f, failure=failure):
            f.write(b"half a checkpoint")  # the crash comes after part of the file was written
            raise failure

        monkeypatch.setattr(torch, "save", crash)
        with pytest.raises(type(failure)):
            save_checkpoint({"epoch": 4}, path)
        monkeypatch.undo()
        assert path.read_bytes() == before
        assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth"]  # no temp file left behind
    assert load_checkpoint(path)["epoch"] == 3

    save_checkpoint({"epoch": 5}, path)  # a successful save replaces the file
    assert load_checkpoint(path)["epoch"] == 5 and sorted(os.listdir(tmp_path)) == ["checkpoint.pth"]
    with pytest.raises(FileNotFoundError, match="no_folder"):
        save_checkpoint({"epoch": 6}, tmp_path / "no_folder" / "checkpoint.pth")


class _Head(nn.Module):
    def __init__(self, layers: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(layers))


class _Small(nn.Module):
    """One head under two names, as the detector registers `bbox_embed` inside the decoder too."""

    def __init__(self, layers: int = 2):
        super().__init__()
        self.bbox_embed = _Head(layers)
        self.decoder = nn.Module()
        self.decoder.bbox_embed = self.bbox_embed
        self.query_embed = nn.Embedding(3, 4)


def test_key_errors_name_the_keys():
    model = _Small()
    weights = _Small().state_dict()
    assert "decoder.bbox_embed.layers.0.weight" in weights  # both names are in the state dict
    load_model_state(model, weights)
    assert torch.equal(model.decoder.bbox_embed.layers[0].weight, weights["bbox_embed.layers.0.weight"])

    missing = {k: v for k, v in weights.items() if k != "query_embed.weight"}
    with pytest.raises(CheckpointError, match=r"missing keys: query_embed\.weight") as error:
        load_model_state(model, missing, source="ckpt.pth")
    assert "ckpt.pth" in str(error.value)

    extra = dict(weights, **{"decoder.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected keys: decoder\.extra\.weight"):
        load_model_state(model, extra)

    wrong = dict(weights, **{"query_embed.weight": torch.zeros(5, 4)})
    with pytest.raises(CheckpointError, match=r"query_embed\.weight: checkpoint \(5, 4\) vs model \(3, 4\)"):
        load_model_state(model, wrong, strict=False)

    # a file that stripped the duplicated names: still missing, and the message says what they alias
    stripped = {k: v for k, v in weights.items() if not k.startswith("decoder.")}
    with pytest.raises(CheckpointError, match=r"missing keys: decoder\.bbox_embed\.layers\.0\.weight") as error:
        load_model_state(model, stripped)
    assert "decoder.bbox_embed.layers.0.weight = bbox_embed.layers.0.weight" in str(error.value)

    result = load_model_state(model, {**missing, "decoder.extra.weight": torch.zeros(1)}, strict=False)
    assert result.missing_keys == ["query_embed.weight"] and result.unexpected_keys == ["decoder.extra.weight"]


def test_long_key_lists_are_grouped():
    model = _Small(layers=8)  # 8 layers x 2 tensors x 2 names + query_embed = 33 keys
    with pytest.raises(CheckpointError) as error:
        load_model_state(model, {"query_embed.weight": torch.zeros(3, 4)})
    message = str(error.value)
    assert "bbox_embed.layers.0.weight, bbox_embed.layers.0.bias" in message
    assert "... (32 in all)" in message and "bbox_embed.layers: 16, decoder.bbox_embed: 16" in message
    assert "bbox_embed.layers.7.bias" not in message  # the list itself stays short


def test_temporaries_of_killed_writes_are_removed(tmp_path, capsys):
    """A process killed while writing leaves `.checkpoint.pth.<pid>.<random>.tmp`; the next write of that file
    removes the ones whose process is gone (and only those)."""
    path = tmp_path / "checkpoint.pth"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    stale = tmp_path / f".checkpoint.pth.{int(dead.stdout)}.0a1b2c3d.tmp"
    stale.write_bytes(b"10 MB of a checkpoint, cut")
    alive = tmp_path / f".checkpoint.pth.{os.getppid()}.0a1b2c3d.tmp"  # another process still writing
    alive.write_bytes(b"in progress")
    other = tmp_path / f".log.txt.{int(dead.stdout)}.0a1b2c3d.tmp"  # another file's: not this write's business
    other.write_bytes(b"x")
    save_checkpoint({"epoch": 1}, path)
    assert not stale.exists() and alive.exists() and other.exists()
    assert f"removed {stale}, left by an interrupted write" in capsys.readouterr().out
    assert load_checkpoint(path)["epoch"] == 1
