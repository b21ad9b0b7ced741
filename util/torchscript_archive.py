"""Read the weights of a TorchScript archive (OpenAI's CLIP `.pt` files) without running any of it.

OpenAI ships CLIP as TorchScript archives. `torch.jit.load` compiles the Python-like code inside the
archive and `torch.load(weights_only=True)` refuses such files, so this module reads the zip itself.

Layout of an archive (`torch.jit.save`, file format version >= 3)::

    <prefix>/data.pkl            the module tree, pickled (protocol 2)
    <prefix>/data/<key>          raw bytes of one storage, referenced from data.pkl
    <prefix>/code/<a>/<b>.py     one file per qualifier `__torch__.<a>.<b>`: the class definitions
    <prefix>/constants.pkl       tensors the code uses as constants (not part of the state dict)
    <prefix>/version, byteorder, .data/serialization_id, *.debug_pkl

How the pieces fit:

* In `data.pkl` every module is `GLOBAL '__torch__.<qualifier> <Class>'`, `NEWOBJ`, then a flat dict of
  *all* its attribute slots (parameters, buffers, submodules, `training`, plain tensor attributes such as
  a causal mask, ...) applied with `BUILD`. Nothing in the pickle says which tensors are parameters.
* Tensors are `torch._utils._rebuild_tensor_v2(<persistent id>, offset, size, stride, requires_grad,
  OrderedDict())`, the persistent id being `('storage', torch.<Type>Storage, '<key>', '<device>', numel)`.
* Which attributes are parameters and buffers is declared in the class body under `code/`::

      class Bottleneck(Module):
        __parameters__ = ["weight", "bias", ]
        __buffers__ = ["running_mean", "running_var", "num_batches_tracked", ]
        weight : Tensor
        ...

  `torch.jit.load` builds the class types from exactly these two lists, and `state_dict()` then lists,
  per module, its parameters (in slot order), its buffers (in slot order), then recurses into the
  attributes whose type is a module. This reader does the same: the pickle gives the values and slot
  order, the code files (read as text, never compiled) give the parameter/buffer declarations.

Plain `torch.save`d state dicts are accepted too (loaded with `weights_only=True`).
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import io
import logging
import os
import pickle
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from util.checkpoint import weights_only_reason

logger = logging.getLogger(__name__)

# SHA-256 of OpenAI's published CLIP archives: the hash directory of each download URL
# (https://openaipublic.azureedge.net/clip/models/<sha256>/<name>.pt, as listed by OpenAI's `clip`
# package and open_clip's `pretrained.py`; OpenAI's downloader checks the file against it).
OPENAI_CLIP_SHA256: dict[str, str] = {
    "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762": "RN50.pt",
    "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599": "RN101.pt",
    "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd": "RN50x4.pt",
    "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa": "RN50x16.pt",
    "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c": "RN50x64.pt",
    "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af": "ViT-B-32.pt",
    "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f": "ViT-B-16.pt",
    "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836": "ViT-L-14.pt",
    "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02": "ViT-L-14-336px.pt",
}

# The legacy typed storage classes the TorchScript pickler names in persistent ids.
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

# torch.jit._pickle helpers: they only tag a list's static type, so the value passes through.
_TYPE_TAG_HELPERS = frozenset({"build_intlist", "build_tensorlist", "build_doublelist", "build_boollist",
                               "restore_type_tag"})


class ArchiveError(pickle.UnpicklingError, ValueError):
    """A file that is not a readable weight archive, or one that asks for something this reader refuses."""


# ----------------------------------------------------------------------------------------------------------
# Restricted unpickling of data.pkl
# ----------------------------------------------------------------------------------------------------------


class ScriptObject:
    """Stand-in for an instance of one of the archive's `__torch__` classes: it only stores the pickled state.

    A subclass is made per qualified class name (see `_RestrictedUnpickler.find_class`); no code of the
    archive's classes ever runs, the class body in `code/` is only read as text.
    """

    qualified_name: str = ""

    def __setstate__(self, state: Any) -> None:
        # Keep the state in its own dict, not in __dict__, so no pickled name can shadow an attribute
        # of this object (e.g. a slot called `__class__` or `qualified_name`).
        self.attributes: dict[str, Any] = dict(state) if isinstance(state, dict) else {}
        self.raw_state: Any = None if isinstance(state, dict) else state

    def __repr__(self) -> str:
        return f"<{self.qualified_name} with {len(getattr(self, 'attributes', {}))} attributes>"


@dataclass(frozen=True)
class _StorageType:
    """What `find_class('torch', '<Type>Storage')` returns: only the element type is needed."""

    name: str
    dtype: torch.dtype


@dataclass
class _Storage:
    """One `data/<key>` record, as raw bytes viewed with the dtype of the reference that loaded it."""

    key: str
    flat: torch.Tensor  # 1-D, dtype of the storage


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles `data.pkl` knowing only tensors, storages, OrderedDict and attribute holders."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._prefix = prefix
        self._path = path
        self._raw: dict[str, torch.Tensor] = {}  # storage key -> uint8 bytes, shared by every view
        self._classes: dict[str, type[ScriptObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch.jit._pickle" and name in _TYPE_TAG_HELPERS:
            return _pass_through
        if (module == "__torch__" or module.startswith("__torch__.")) and name.isidentifier():
            qualified = f"{module}.{name}"
            if qualified not in self._classes:
                self._classes[qualified] = type(name, (ScriptObject,), {"qualified_name": qualified,
                                                                          "__module__": __name__})
            return self._classes[qualified]
        raise ArchiveError(
            f"{self._path}: refused to load: its data.pkl asks for the global '{module}.{name}', which a weight "
            f"archive does not need and which could run code. Only tensors, storages, OrderedDict and "
            f"TorchScript module attributes are read."
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ArchiveError(f"{self._path}: unexpected persistent id {pid!r} in data.pkl "
                               f"(expected ('storage', type, key, device, numel))")
        _, storage_type, key, _device, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise ArchiveError(f"{self._path}: storage record {pid!r} has no storage type")
        if not isinstance(key, str) or not key or "/" in key or not isinstance(numel, int):
            raise ArchiveError(f"{self._path}: malformed storage record {pid!r}")
        raw = self._read_storage(key)
        itemsize = torch.empty((), dtype=storage_type.dtype).element_size()
        if raw.numel() != numel * itemsize:
            raise ArchiveError(f"{self._path}: storage data/{key} has {raw.numel()} bytes, data.pkl expects "
                               f"{numel} x {storage_type.name} = {numel * itemsize} bytes")
        return _Storage(key, raw.view(storage_type.dtype))

    def _read_storage(self, key: str) -> torch.Tensor:
        if key not in self._raw:
            name = f"{self._prefix}/data/{key}"
            try:
                data = self._archive.read(name)
            except KeyError:
                raise ArchiveError(f"{self._path}: data.pkl references storage {name}, which is not in the "
                                   f"archive") from None
            # bytearray: a writable buffer, so the tensors own ordinary memory (no read-only warnings).
            self._raw[key] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else \
                torch.empty(0, dtype=torch.uint8)
        return self._raw[key]

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                        backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
        """`_rebuild_tensor_v2` on a storage of this archive: a strided view, so shared storages stay shared."""
        if not isinstance(storage, _Storage):
            raise ArchiveError(f"{self._path}: a tensor in data.pkl is built from {type(storage).__name__}, "
                               f"not from a storage of the archive")
        if not (isinstance(offset, int) and _int_tuple(size) and _int_tuple(stride) and len(size) == len(stride)):
            raise ArchiveError(f"{self._path}: malformed tensor record on storage {storage.key}: offset {offset!r}, "
                               f"size {size!r}, stride {stride!r}")
        if backward_hooks or metadata:
            raise ArchiveError(f"{self._path}: a tensor on storage {storage.key} carries backward hooks or tensor "
                               f"metadata, which a weight archive does not have")
        size, stride = tuple(size), tuple(stride)
        # Check the bounds here so a corrupt record gets an error naming it, not a bare as_strided failure.
        if offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
            raise ArchiveError(f"{self._path}: negative offset/size/stride in a tensor on storage {storage.key}")
        if all(s > 0 for s in size):
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= storage.flat.numel():
                raise ArchiveError(f"{self._path}: tensor of size {size}, stride {stride}, offset {offset} reaches "
                                   f"element {last} of storage {storage.key}, which has {storage.flat.numel()}")
        return torch.as_strided(storage.flat, size, stride, offset)


def _pass_through(value: Any, *_type_info: Any) -> Any:
    return value


def _int_tuple(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


# ----------------------------------------------------------------------------------------------------------
# Class declarations from code/
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ClassDeclaration:
    """What the archive's `code/` says about one class: is it a module, which slots are parameters/buffers."""

    is_module: bool
    parameters: list[str] = field(default_factory=list)
    buffers: list[str] = field(default_factory=list)


def _parse_name_list(line: str, where: str) -> list[str]:
    _, _, rhs = line.partition("=")
    try:
        value = ast.literal_eval(rhs.strip())  # a literal only; nothing is evaluated
    except (ValueError, SyntaxError) as e:
        raise ArchiveError(f"{where}: cannot read {line.strip()!r}: {e}") from None
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ArchiveError(f"{where}: {line.strip()!r} is not a list of names")
    return value


def parse_class_declarations(source: str, qualifier: str, where: str) -> dict[str, ClassDeclaration]:
    """`qualified name -> ClassDeclaration` for the classes of one `code/` file (read as text).

    The TorchScript printer writes each class as `class Name(Module):` at column 0 followed by an
    indented body whose first-level statements include the one-line `__parameters__ = [...]` and
    `__buffers__ = [...]` lists (the importer, `import_source.cpp`, reads the same two statements).
    Method bodies sit deeper and are skipped, as are top-level `def`s, `import`s and `op_version_set`.
    """
    classes: dict[str, ClassDeclaration] = {}
    current: ClassDeclaration | None = None
    body_indent: int | None = None
    for number, line in enumerate(source.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            current, body_indent = None, None
            if line.startswith("class "):
                header = line[len("class "):].split(":", 1)[0]
                name, _, base = header.partition("(")
                name = name.strip()
                if not name.isidentifier():
                    raise ArchiveError(f"{where}:{number}: cannot read class header {line!r}")
                current = ClassDeclaration(is_module=base.rstrip(")").strip() == "Module")
                classes[f"{qualifier}.{name}"] = current
            continue
        if current is None:
            continue
        if body_indent is None:
            body_indent = indent
        if indent != body_indent:
            continue
        target = stripped.split("=", 1)[0].strip()
        if target == "__parameters__":
            current.parameters = _parse_name_list(stripped, f"{where}:{number}")
        elif target == "__buffers__":
            current.buffers = _parse_name_list(stripped, f"{where}:{number}")
    return classes


def _class_declarations(archive: zipfile.ZipFile, prefix: str, path: str) -> dict[str, ClassDeclaration]:
    code_dir = f"{prefix}/code/"
    declarations: dict[str, ClassDeclaration] = {}
    for name in archive.namelist():
        if name.startswith(code_dir) and name.endswith(".py"):
            # code/__torch__/torch/nn/modules/conv.py holds the classes of `__torch__.torch.nn.modules.conv`
            qualifier = name[len(code_dir):-len(".py")].replace("/", ".")
            try:
                source = archive.read(name).decode("utf-8")
            except UnicodeDecodeError as e:
                raise ArchiveError(f"{path}: {name} is not UTF-8 text ({e})") from None
            declarations.update(parse_class_declarations(source, qualifier, f"{path}:{name}"))
    return declarations


# ----------------------------------------------------------------------------------------------------------
# The module tree -> state dict
# ----------------------------------------------------------------------------------------------------------


def _collect_state(obj: ScriptObject, prefix: str, declarations: dict[str, ClassDeclaration],
                   out: dict[str, torch.Tensor], path: str, ancestors: tuple[int, ...] = ()) -> None:
    """Append `obj`'s parameters, buffers, then its submodules' state, as `nn.Module.state_dict` orders them."""
    where = prefix.rstrip(".") or "<root>"
    if id(obj) in ancestors:
        raise ArchiveError(f"{path}: module {where} contains itself")
    declaration = declarations.get(obj.qualified_name)
    if declaration is None or not declaration.is_module:
        raise ArchiveError(f"{path}: module {where} is a {obj.qualified_name}, for which the archive's code/ "
                           f"has no `class ...(Module):` definition")
    attributes = getattr(obj, "attributes", None)
    if attributes is None:
        raise ArchiveError(f"{path}: module {where} ({obj.qualified_name}) has no pickled attributes")
    declared = declaration.parameters + declaration.buffers
    absent = [name for name in declared if name not in attributes]
    if absent:
        raise ArchiveError(f"{path}: module {where} ({obj.qualified_name}) declares {absent} as parameters/buffers "
                           f"but data.pkl has no such attributes")
    # Slot order (the pickled dict's order) decides the order within parameters and within buffers,
    # as in torch's named_parameters/named_buffers; an unset Optional parameter (None) is skipped.
    for kind in (set(declaration.parameters), set(declaration.buffers)):
        for name, value in attributes.items():
            if name in kind and isinstance(value, torch.Tensor):
                out[prefix + name] = value
    for name, value in attributes.items():
        if isinstance(value, ScriptObject):
            child = declarations.get(value.qualified_name)
            # Attributes holding script objects that are not modules (TorchScript classes) are not in state_dict.
            if child is not None and child.is_module:
                _collect_state(value, f"{prefix}{name}.", declarations, out, path, ancestors + (id(obj),))


def _archive_prefix(archive: zipfile.ZipFile, path: str) -> str:
    prefixes = sorted({n.split("/", 1)[0] for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")})
    if len(prefixes) != 1:
        raise ArchiveError(f"{path}: expected one '<name>/data.pkl' in the zip, found {len(prefixes)} "
                           f"({prefixes[:5]}); not a TorchScript archive or torch checkpoint")
    return prefixes[0]


def _is_torchscript(archive: zipfile.ZipFile, prefix: str) -> bool:
    # torch.save zips have data.pkl and data/ too; only TorchScript archives carry code/ and constants.pkl.
    return any(n.startswith(f"{prefix}/code/") or n == f"{prefix}/constants.pkl" for n in archive.namelist())


def read_torchscript_state_dict(path: str) -> OrderedDict[str, torch.Tensor]:
    """The restricted reader alone: `torch.jit.load(path).state_dict()` without compiling or running anything."""
    with zipfile.ZipFile(path) as archive:
        prefix = _archive_prefix(archive, path)
        names = set(archive.namelist())
        byteorder_file = f"{prefix}/byteorder"
        if byteorder_file in names:
            byteorder = archive.read(byteorder_file).decode("ascii", "replace").strip()
            if byteorder != sys.byteorder:
                raise ArchiveError(f"{path}: the archive's tensors are {byteorder}-endian, this machine is "
                                   f"{sys.byteorder}-endian; byte swapping is not supported")
        declarations = _class_declarations(archive, prefix, path)
        unpickler = _RestrictedUnpickler(archive.read(f"{prefix}/data.pkl"), archive, prefix, path)
        try:
            root = unpickler.load()
        except ArchiveError:
            raise
        except Exception as e:  # a truncated or malformed pickle: say which file, keep the cause
            raise ArchiveError(f"{path}: cannot read {prefix}/data.pkl ({type(e).__name__}: {e})") from e
    if not isinstance(root, ScriptObject):
        raise ArchiveError(f"{path}: {prefix}/data.pkl holds a {type(root).__name__}, not a TorchScript module")
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    _collect_state(root, "", declarations, state, path)
    return state


def _read_plain_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A `torch.save`d dict of tensors (optionally under `state_dict`, optionally with DDP's `module.` prefix)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # to recognise a CORA checkpoint below
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ArchiveError(f"{path}: refused to load: it is not a TorchScript archive, and as a torch.save file it "
                           f"holds objects other than tensors and containers, which could run code "
                           f"({weights_only_reason(e)})") from e
    except Exception as e:
        raise ArchiveError(f"{path}: neither a TorchScript archive nor a readable torch.save file "
                           f"({type(e).__name__}: {e})") from e
    if isinstance(state, dict) and isinstance(state.get("model"), dict) and "query_embed.weight" in state["model"]:
        raise ArchiveError(f"{path} is a CORA checkpoint (keys {sorted(map(str, state))[:6]}), not a CLIP archive: "
                           f"pass it as --resume (a full one holds CLIP's weights; --model_path names OpenAI's "
                           f"archive, e.g. RN50.pt)")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        found = type(state).__name__ if not isinstance(state, dict) else f"a dict with keys {list(state)[:10]}"
        raise ArchiveError(f"{path}: expected a CLIP TorchScript archive or a dict of tensors, found {found}")
    if all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def sha256_of(path: str, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (OpenAI's archives are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a CLIP weight file, read without running code from it.

    A TorchScript archive gives the same keys, order, dtypes and values as
    `torch.jit.load(path, map_location='cpu').state_dict()`; any other file must be a `torch.save`d dict of
    tensors (`weights_only=True`). Only when the restricted reader fails on a file whose SHA-256 is one of
    OpenAI's published CLIP archives does it fall back to `torch.jit.load` (with a warning): that file is
    OpenAI's own, byte for byte. Never for any other file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (expected a CLIP TorchScript archive such as RN50.pt)")
    if not zipfile.is_zipfile(path):
        return _read_plain_state_dict(path)  # pre-1.6 torch.save files are plain pickles, not zips
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _archive_prefix(archive, path)
            torchscript = _is_torchscript(archive, prefix)
        if not torchscript:
            return _read_plain_state_dict(path)
        return read_torchscript_state_dict(path)
    except Exception as error:
        return _trusted_fallback(path, error)


def _trusted_fallback(path: str, error: Exception) -> dict[str, torch.Tensor]:
    """`torch.jit.load` for OpenAI's own archives only; for any other file, re-raise the reader's error."""
    digest = sha256_of(path)
    name = OPENAI_CLIP_SHA256.get(digest)
    if name is None:
        if isinstance(error, ArchiveError):
            raise error
        raise ArchiveError(f"{path}: cannot read the archive ({type(error).__name__}: {error})") from error
    logger.warning("%s: the restricted archive reader failed (%s: %s); the file's SHA-256 is that of OpenAI's "
                   "published %s, so it is loaded with torch.jit.load instead", path, type(error).__name__, error,
                   name)
    module = torch.jit.load(path, map_location="cpu")
    return OrderedDict((k, v) for k, v in module.state_dict().items())
