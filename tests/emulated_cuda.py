"""An emulated CUDA device for tests on a CPU-only machine: tensors that report `cuda`, computed on the
CPU, every op checked against CUDA's device-mixing rules and every host sync counted (EmulatedCuda)."""
from __future__ import annotations

import importlib
import os
import traceback
import weakref
from pathlib import Path

import torch
import torch.utils._pytree as pytree
import torchvision  # noqa: F401 - registers torch.ops.torchvision
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode


class DeviceMixError(RuntimeError):
    """An operation mixed an (emulated) CUDA tensor with a CPU tensor, which CUDA refuses."""


class EmulatedCuda:
    """A CUDA device emulated on the CPU, for machines without a GPU: code under test runs its CUDA path
    (`x.device`, `x.is_cuda` say cuda:0) while every tensor computes on the CPU, and what only a GPU
    would notice is checked or counted.

        with EmulatedCuda() as cuda:
            model.to("cuda"); ...            # factories with device='cuda', .to / .cuda / .cpu, Module.to
        cuda.syncs                           # [(kind, where)], the host syncs, in order

    A tensor is "on CUDA" when its storage is one the emulation created as such (`.to('cuda')`, a
    factory with `device='cuda'`, `pin_memory`'s copies are CPU) or any aten op produced from a CUDA
    input (a `TorchDispatchMode`, so backward, torchvision's ops and C++ internals are covered; views
    share their base's storage). A storage leaves the registry when it is freed (before its address can
    be reused).

    Checked as CUDA does: an op with CUDA inputs and a CPU input of one or more dimensions raises
    `DeviceMixError` (a 0-dim CPU tensor is allowed as a scalar, as in CUDA; indices of advanced
    indexing and the source of `copy_` may be CPU tensors, as in CUDA); `.numpy()` of a CUDA tensor
    raises. Counted in `syncs` (each a host sync on a real GPU: the host waits for the queued work):
    `d2h` copies to the host (`.cpu()`, `.to('cpu')`, `.tolist()`, `copy_` into a CPU tensor, `.item()`,
    `bool()` / `int()` / `float()` of a tensor), `size` ops whose output size depends on the data
    (`nonzero`, boolean-mask indexing, `masked_select`, `unique`, `repeat_interleave` without
    `output_size`, torchvision's `nms`), and `h2d` blocking copies to the device (`.to('cuda')` of
    pageable memory or without `non_blocking`, `torch.tensor(..., device='cuda')`, CPU indices of
    advanced indexing, `copy_` from a CPU tensor), which CUDA performs with a stream synchronisation.
    `.to('cuda', non_blocking=True)` of pinned memory (`pin_memory()`) is asynchronous and not counted.

    While active, `torch.cuda.is_available()` is True with one device (a `--device cuda` check passes).
    """

    DEVICE = torch.device("cuda", 0)
    # what code asks torch.cuda (and the optimizers' CUDA-graph check, which would start a real CUDA context)
    _PATCHES = ((torch.cuda, "is_available", lambda: True), (torch.cuda, "device_count", lambda: 1),
                (torch.cuda, "current_device", lambda: 0), (torch.cuda, "max_memory_allocated", lambda *a, **k: 0),
                (torch.optim.Optimizer, "_accelerator_graph_capture_health_check", lambda self: None))

    def __init__(self, repo_root: str | None = None):
        self._cuda: set[int] = set()  # storages (StorageImpl addresses) on the emulated GPU
        self._pinned: set[int] = set()  # storages in "page-locked" memory
        self.syncs: list[tuple[str, str]] = []
        self._root = repo_root or str(Path(__file__).resolve().parents[1])
        self._modes = (_EmulatedCudaFunctions(self), _EmulatedCudaDispatch(self))
        self._saved: dict[tuple, object] = {}
        self._quiet = 0  # > 0 inside an emulated device-to-device copy (deepcopy): nothing checked or recorded

    # -------------------------------------------------------------------------------- state
    @staticmethod
    def _key(t: torch.Tensor) -> int | None:
        try:
            return t.untyped_storage()._cdata
        except (RuntimeError, NotImplementedError):
            return None

    def is_cuda(self, t) -> bool:
        return isinstance(t, torch.Tensor) and self._key(t) in self._cuda

    @staticmethod
    def _add(registry: set[int], t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in registry:
            registry.add(key)
            # a storage's Python object lives exactly as long as the storage: the key goes with it, before
            # the address can be reused
            weakref.finalize(storage, registry.discard, key).atexit = False
        return t

    def tag(self, t: torch.Tensor) -> torch.Tensor:
        return self._add(self._cuda, t)

    def untag(self, t: torch.Tensor) -> torch.Tensor:
        self._cuda.discard(self._key(t))
        return t

    def is_pinned(self, t: torch.Tensor) -> bool:
        return self._key(t) in self._pinned

    def record(self, kind: str, what: str) -> None:
        if self._quiet:
            return
        self.syncs.append((kind, f"{what} at {self._where()}"))

    def _where(self) -> str:
        """The innermost frame of the project's code (not this emulation, not torch)."""
        for frame in reversed(traceback.extract_stack()):
            name = frame.filename
            if name.startswith(self._root) and name != __file__ and "site-packages" not in name:
                return f"{os.path.relpath(name, self._root)}:{frame.lineno} ({frame.name})"
        return "?"

    def counts(self, since: int = 0) -> dict[str, int]:
        """How many syncs of each kind were recorded after the first `since`."""
        out: dict[str, int] = {}
        for kind, _ in self.syncs[since:]:
            out[kind] = out.get(kind, 0) + 1
        return out

    # -------------------------------------------------------------------------------- context
    def __enter__(self) -> EmulatedCuda:
        patches = list(self._PATCHES)
        # torch's foreach grouping reads the real device (cpu) and would send a group's results "back" there
        for module in map(importlib.import_module, ("torch.nn.utils.clip_grad", "torch.optim.optimizer")):
            patches.append((module, "_group_tensors_by_device_and_dtype",
                            self._grouping(module.__dict__["_group_tensors_by_device_and_dtype"])))
        for owner, name, fake in patches:
            self._saved[(owner, name)] = owner.__dict__[name]
            setattr(owner, name, fake)
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        for (owner, name), original in self._saved.items():
            setattr(owner, name, original)
        self._saved.clear()

    def _grouping(self, group):
        def grouped(tensorlistlist, *args, **kwargs):
            out = group(tensorlistlist, *args, **kwargs)

            def first(lists):
                return next(t for t in pytree.tree_leaves(lists) if isinstance(t, torch.Tensor))

            return {(self.DEVICE if self.is_cuda(first(lists)) else device, dtype): lists
                    for (device, dtype), lists in out.items()}
        return grouped

    # -------------------------------------------------------------------------------- moves
    def _is_cuda_device(self, device) -> bool:
        if device is None:
            return False
        device = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        if device.type == "cuda" and device.index not in (None, 0):
            raise RuntimeError(f"CUDA error: invalid device ordinal ({device}; the emulation has one GPU)")
        return device.type == "cuda"

    def move(self, t: torch.Tensor, to_cuda: bool | None, dtype=None, non_blocking: bool = False, copy: bool = False):
        """`t` converted to `dtype` and moved to the emulated GPU (True), the CPU (False) or left (None)."""
        src_cuda = self.is_cuda(t)
        out = t.to(dtype=dtype, copy=copy) if dtype is not None or copy else t
        if to_cuda is None or to_cuda == src_cuda:
            return out
        fresh = out.clone() if self._key(out) == self._key(t) else out
        if to_cuda:
            if not (non_blocking and self.is_pinned(t)):
                self.record("h2d", f"copy of {tuple(t.shape)} to the GPU" + (" (pageable)" if non_blocking else ""))
            return self.tag(fresh)
        if not non_blocking:
            self.record("d2h", f".cpu() / .to('cpu') of {tuple(t.shape)}")
        return self.untag(fresh)


_CUDA_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor}
_NEW_ON_SELF = {torch.Tensor.new_tensor, torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_full,
                torch.Tensor.new_empty}


class _EmulatedCudaFunctions(TorchFunctionMode):
    """The Python-level half: device properties, device arguments, moves, host copies."""

    def __init__(self, emu: EmulatedCuda):
        super().__init__()
        self.emu = emu
        self.getters = {torch.Tensor.device.__get__: lambda t: EmulatedCuda.DEVICE if emu.is_cuda(t) else t.device,
                        torch.Tensor.is_cuda.__get__: emu.is_cuda,
                        torch.Tensor.is_cpu.__get__: lambda t: t.is_cpu and not emu.is_cuda(t)}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        emu = self.emu
        getter = self.getters.get(func) if not kwargs and len(args) == 1 else None
        if getter is not None:
            return getter(args[0])
        if func is torch.Tensor.get_device:
            return 0 if emu.is_cuda(args[0]) else args[0].get_device()
        if func is torch.Tensor.to:
            return self._to(args, kwargs)
        if func is torch.Tensor.cuda:
            device = args[1] if len(args) > 1 else kwargs.get("device")
            emu._is_cuda_device("cuda" if device is None else device)
            return emu.move(args[0], True, non_blocking=kwargs.get("non_blocking", False))
        if func is torch.Tensor.cpu:
            return emu.move(args[0], False)
        if func is torch.Tensor.pin_memory:
            if emu.is_cuda(args[0]):
                raise RuntimeError("cannot pin a CUDA tensor: only dense CPU tensors can be pinned")
            return emu._add(emu._pinned, args[0].clone())
        if func is torch.Tensor.is_pinned:
            return emu.is_pinned(args[0])
        if func is torch.Tensor.tolist:
            if emu.is_cuda(args[0]):
                emu.record("d2h", f".tolist() of {tuple(args[0].shape)}")
            return func(*args, **kwargs)
        if func in (torch.Tensor.numpy, torch.Tensor.__array__) and emu.is_cuda(args[0]):
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                            "to host memory first.")
        if func is torch.Tensor.__deepcopy__:  # copies the storage through a CPU one: a device copy on a GPU
            emu._quiet += 1
            try:
                out = func(*args, **kwargs)
            finally:
                emu._quiet -= 1
            return emu.tag(out) if emu.is_cuda(args[0]) else out
        device = kwargs.get("device")
        if device is None and func in _NEW_ON_SELF and emu.is_cuda(args[0]):
            device = EmulatedCuda.DEVICE
        if device is not None and not emu._is_cuda_device(device):  # explicitly on the CPU
            inputs = {emu._key(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            out = func(*args, **kwargs)
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and emu._key(t) not in inputs:
                    emu.untag(t)
            return out
        if emu._is_cuda_device(device):
            kwargs["device"] = "cpu"
            inputs = {emu._key(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            if func in _CUDA_FROM_DATA and not any(emu.is_cuda(t) for t in pytree.tree_leaves(args)
                                                    if isinstance(t, torch.Tensor)):
                emu.record("h2d", f"{func.__name__}(..., device='cuda')")
            out = func(*args, **kwargs)
            leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            if len(leaves) == 1 and out is leaves[0] and emu._key(out) in inputs and not emu.is_cuda(out):
                out = out.clone()  # as_tensor(cpu_tensor, device='cuda') copies
                leaves = [out]
            for t in leaves:
                emu.tag(t)
            return out
        return func(*args, **kwargs)

    def _to(self, args, kwargs):
        emu = self.emu
        t, rest = args[0], args[1:]
        if rest and isinstance(rest[0], torch.Tensor):  # .to(other, non_blocking=False, copy=False)
            other = rest[0]
            non_blocking = rest[1] if len(rest) > 1 else kwargs.get("non_blocking", False)
            return emu.move(t, emu.is_cuda(other), other.dtype, non_blocking, kwargs.get("copy", False))
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*rest, **kwargs)
        to_cuda = None if device is None else emu._is_cuda_device(device)
        return emu.move(t, to_cuda, dtype, non_blocking, kwargs.get("copy", False))


# The ops CUDA accepts with CPU tensors among CUDA ones (beyond 0-dim scalars): advanced indexing's
# indices, copy_'s source or destination.
_MIXED_OK = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default,
             torch.ops.aten._index_put_impl_.default, torch.ops.aten.copy_.default}
_SIZE_SYNC = {torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default, torch.ops.aten._unique2.default,
              torch.ops.aten.unique_dim.default, torch.ops.aten.unique_consecutive.default,
              torch.ops.torchvision.nms.default}


class _EmulatedCudaDispatch(TorchDispatchMode):
    """The aten-level half: which outputs are on the GPU, device mixing, syncs of ops."""

    def __init__(self, emu: EmulatedCuda):
        super().__init__()
        self.emu = emu

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        emu = self.emu
        with torch._C.DisableTorchFunction():
            tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            cuda = [emu.is_cuda(t) for t in tensors]
            if any(cuda) and not emu._quiet:
                self._check(func, args, kwargs, tensors, cuda)
            out = func(*args, **kwargs)
            if any(cuda):
                inputs = {emu._key(t) for t in tensors}
                for t in pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor) and emu._key(t) not in inputs:
                        emu.tag(t)
            return out

    def _check(self, func, args, kwargs, tensors, cuda) -> None:
        emu = self.emu
        stray = [t for t, c in zip(tensors, cuda) if not c and t.dim() > 0]
        if stray and func not in _MIXED_OK:
            raise DeviceMixError(
                f"Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu! "
                f"({func}: cpu tensors of shapes {[tuple(t.shape) for t in stray]}; at {emu._where()})")
        if func is torch.ops.aten.copy_.default:
            dst, src = args[0], args[1]
            if emu.is_cuda(src) and not emu.is_cuda(dst):
                emu.record("d2h", f"copy_ of {tuple(src.shape)} into a CPU tensor")
            elif src.dim() > 0 and not emu.is_cuda(src):
                emu.record("h2d", f"copy_ of {tuple(src.shape)} from a CPU tensor")
            return
        if func is torch.ops.aten._local_scalar_dense.default:
            emu.record("d2h", ".item() / bool() / int() / float()")
        elif func in _SIZE_SYNC:
            emu.record("size", func.__name__)
        elif func is torch.ops.aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            emu.record("size", "repeat_interleave without output_size")
        elif func in _MIXED_OK and func is not torch.ops.aten.copy_.default:
            indices = [i for i in (args[1] if len(args) > 1 else kwargs.get("indices", ())) if i is not None]
            if any(i.dtype in (torch.bool, torch.uint8) for i in indices):
                emu.record("size", f"{func.__name__} with a boolean mask")
            if any(not emu.is_cuda(i) and i.dim() > 0 for i in indices):
                emu.record("h2d", f"{func.__name__} with CPU indices")
