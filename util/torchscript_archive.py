"""Read the weights of a TorchScript archive (OpenAI's CLIP `.pt` files) without running any of it.

`torch.jit.load` compiles the archive's code and `torch.load(weights_only=True)` refuses such files,
so this module reads the zip itself: `data.pkl` is unpickled by an unpickler that only knows
tensors, storages and plain attribute holders for the archive's module classes, and the class
bodies in `code/` are read as text for their `__parameters__` / `__buffers__` lists. The result
equals `torch.jit.load(path).state_dict()`: same keys, order, dtypes and values.
"""
from __future__ import annotations

import ast
import os
import pickle
import re
import zipfile
from collections import OrderedDict

import torch

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_CLASS_RE = re.compile(r"^class (\w+)\(Module\):\s*$", re.MULTILINE)
_LIST_RE = re.compile(r"^\s+__(parameters|buffers)__ = (\[.*?\])\s*$", re.MULTILINE)


class ArchiveError(ValueError):
    pass


class _ScriptObject:
    """Stands in for one of the archive's module classes: holds its pickled attributes."""

    qualname = ""


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _identity(value, *_):
    return value


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: str):
        import io

        super().__init__(io.BytesIO(data))
        self.archive = archive
        self.prefix = prefix
        self.path = path
        self.storages: dict[str, torch.Tensor] = {}
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch.jit._pickle" and name in ("build_intlist", "build_tensorlist", "build_doublelist",
                                                       "build_boollist", "restore_type_tag"):
            return _identity
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self.classes:
                self.classes[qualname] = type(name, (_ScriptObject,), {"qualname": qualname})
            return self.classes[qualname]
        raise ArchiveError(f"{self.path}: refused to load: data.pkl references {module}.{name}, "
                           f"which a CLIP weight archive never needs (it could run code)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise ArchiveError(f"{self.path}: unexpected persistent id {pid!r} in data.pkl")
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise ArchiveError(f"{self.path}: unexpected storage type {storage_type!r}")
        if key not in self.storages:
            raw = self.archive.read(f"{self.prefix}/data/{key}")
            flat = torch.frombuffer(bytearray(raw), dtype=storage_type.dtype) if raw else \
                torch.empty(0, dtype=storage_type.dtype)
            if flat.numel() != numel:
                raise ArchiveError(f"{self.path}: storage {key} holds {flat.numel()} values, data.pkl says {numel}")
            self.storages[key] = flat
        return self.storages[key]


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, requires_grad=False, hooks=None, *_):
    return storage.as_strided(tuple(size), tuple(stride), offset)


def _declared_tensors(archive: zipfile.ZipFile, prefix: str) -> dict[str, tuple[list[str], list[str]]]:
    """`qualname -> (__parameters__, __buffers__)` for every module class in `code/`, read as text."""
    declared = {}
    code_dir = f"{prefix}/code/"
    for name in archive.namelist():
        if not (name.startswith(code_dir) and name.endswith(".py")):
            continue
        module = name[len(code_dir):-len(".py")].replace("/", ".")
        text = archive.read(name).decode("utf-8")
        starts = list(_CLASS_RE.finditer(text))
        for i, match in enumerate(starts):
            body = text[match.end(): starts[i + 1].start() if i + 1 < len(starts) else len(text)]
            lists = {kind: ast.literal_eval(value) for kind, value in _LIST_RE.findall(body)}
            declared[f"{module}.{match.group(1)}"] = (lists.get("parameters", []), lists.get("buffers", []))
    return declared


def _walk(obj: _ScriptObject, prefix: str, declared, out: dict[str, torch.Tensor], path: str) -> None:
    if obj.qualname not in declared:
        raise ArchiveError(f"{path}: no class definition for {obj.qualname} in the archive's code/")
    params, buffers = declared[obj.qualname]
    attrs = vars(obj)
    # nn.Module.state_dict order: parameters, then buffers, then submodules
    for name in list(params) + list(buffers):
        value = attrs.get(name)
        if torch.is_tensor(value):
            out[prefix + name] = value
    for name, value in attrs.items():
        if isinstance(value, _ScriptObject):
            _walk(value, f"{prefix}{name}.", declared, out, path)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a TorchScript archive, or of a plain `torch.save`d state dict (weights_only)."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    if not zipfile.is_zipfile(path):
        raise ArchiveError(f"{path}: not a TorchScript archive or torch checkpoint (not a zip file)")
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkl:
            raise ArchiveError(f"{path}: no data.pkl in the archive")
        prefix = pkl[0].split("/")[0]
        if not any(n.startswith(f"{prefix}/code/") for n in archive.namelist()):
            return _plain_state_dict(path)
        unpickler = _RestrictedUnpickler(archive.read(pkl[0]), archive, prefix, path)
        try:
            root = unpickler.load()
        except ArchiveError:
            raise
        except Exception as e:
            raise ArchiveError(f"{path}: cannot read data.pkl ({type(e).__name__}: {e})") from e
        if not isinstance(root, _ScriptObject):
            raise ArchiveError(f"{path}: data.pkl does not hold a module (found {type(root).__name__})")
        out: dict[str, torch.Tensor] = OrderedDict()
        _walk(root, "", _declared_tensors(archive, prefix), out, path)
    return out


def _plain_state_dict(path: str) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ArchiveError(f"{path}: expected a TorchScript CLIP archive or a dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
