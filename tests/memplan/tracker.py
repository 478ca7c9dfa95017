"""Live device bytes of a region of code, counted per storage: what ``make memplan`` traces.

:class:`LiveBytes` is a ``TorchDispatchMode``: every tensor an operator returns
on the tracked device type has its storage counted once (views share it) until
the storage is freed (a weak reference to the storage, as PyTorch's own
``MemTracker`` does). ``peak`` is the maximum of the live total. Under
``FakeTensorMode`` nothing is allocated or computed, so the real model code runs
at full size on a machine without the memory or the GPU.

Each allocation gets a label: the phase set with :meth:`phase` (``weights``,
``cache``, ``sampler state``...) or, for activations, the innermost running
module's class and the operator (``WanSelfAttention/_scaled_dot_product...``).
At every new peak the per-label totals are kept, so :meth:`dominant` says what
filled the peak.

What it does not see: memory kernels allocate inside themselves without a
tensor (cuDNN/CPU convolution workspaces, attention scratch), the caching
allocator's block rounding and fragmentation, and CUDA context memory.
"""
from __future__ import annotations

import contextlib
import weakref
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Count live storage bytes on ``device_type`` (``"cuda"`` for a fake GPU, ``"cpu"`` to mirror a CPU run)."""

    def __init__(self, device_type: str = "cuda") -> None:
        super().__init__()
        self.device_type = device_type
        self.live: dict[int, tuple[int, str]] = {}
        self.current = 0
        self.peak = 0
        self.by_label: Counter = Counter()
        self.peak_by_label: Counter = Counter()
        self._phase: str | None = None
        self._modules: list[str] = []
        self._hooks: list = []
        self.marks: dict[str, int] = {}

    # -------------------------------------------------------------- labels
    @contextlib.contextmanager
    def phase(self, label: str):
        """Allocations inside the block are labelled ``label`` (e.g. ``weights``)."""
        previous, self._phase = self._phase, label
        try:
            yield
        finally:
            self._phase = previous

    def _label(self, func) -> str:
        if self._phase is not None:
            return self._phase
        op = getattr(func, "__name__", str(func)).split(".")[0]
        module = self._modules[-1] if self._modules else "-"
        return f"{module}/{op}"

    def __enter__(self):
        pre = torch.nn.modules.module.register_module_forward_pre_hook(self._push)
        # always_call: a forward that raises (a chunked block stops a pass by raising) still pops its module
        post = torch.nn.modules.module.register_module_forward_hook(self._pop, always_call=True)
        self._hooks = [pre, post]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return super().__exit__(*exc)

    def _push(self, module, args):
        self._modules.append(type(module).__name__)

    def _pop(self, module, args, output):
        if self._modules:
            self._modules.pop()

    # -------------------------------------------------------------- counting
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                self._track(t, func)
        return out

    def _track(self, tensor: torch.Tensor, func) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        nbytes = storage.nbytes()
        known = self.live.get(key)
        if known is not None:
            if nbytes != known[0]:  # resized in place
                self._add(key, nbytes - known[0], known[1])
                self.live[key] = (nbytes, known[1])
            return
        label = self._label(func)
        self.live[key] = (nbytes, label)
        weakref.finalize(storage, self._free, key)
        self._add(key, nbytes, label)

    def _add(self, key: int, nbytes: int, label: str) -> None:
        self.current += nbytes
        self.by_label[label] += nbytes
        if self.current > self.peak:
            self.peak = self.current
            self.peak_by_label = +self.by_label

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.current -= entry[0]
            self.by_label[entry[1]] -= entry[0]

    # -------------------------------------------------------------- reading
    def mark(self, name: str) -> None:
        """Remember the live total now under ``name`` (e.g. after the weights are built)."""
        self.marks[name] = self.current

    def reset_peak(self) -> None:
        self.peak = self.current
        self.peak_by_label = +self.by_label

    def dominant(self, n: int = 3, skip: tuple[str, ...] = ("weights",)) -> list[tuple[str, int]]:
        """The ``n`` labels holding the most bytes at the peak (``skip`` excluded)."""
        items = [(k, v) for k, v in self.peak_by_label.items() if k not in skip and v > 0]
        return sorted(items, key=lambda kv: -kv[1])[:n]


@contextlib.contextmanager
def no_fake_constants():
    """Fake tensors would otherwise keep tiny constants and replay ops on them for real, on a device this
    machine may not have (``torch.tensor([s], device="cuda")`` under ``inference_mode``); HostScalars keeps
    host values instead."""
    import torch._subclasses.fake_tensor as fake_tensor

    limit, fake_tensor.CONSTANT_NUMEL_LIMIT = fake_tensor.CONSTANT_NUMEL_LIMIT, 0
    try:
        yield
    finally:
        fake_tensor.CONSTANT_NUMEL_LIMIT = limit


class HostScalars(TorchDispatchMode):
    """Lets host code read back small tensors built from host numbers, under fake tensors.

    Sigmas and timesteps are made from Python floats (``torch.tensor([s], device=...)``)
    and host code compares them (``(timestep[0] > end).item()``). A fake tensor on a CUDA
    device cannot carry such a constant, so this mode keeps a real CPU copy of every small
    tensor made only from host data, or from tensors it already knows, and answers
    ``.item()`` from it. Reading back anything computed from model data still raises
    (``DataDependentOutputException``), as it must.
    """

    MAX_NUMEL = 64
    ATTR = "_memplan_host_value"  # the real CPU copy rides on the tensor (no weak references: Module.to swaps tensors)

    def __init__(self) -> None:
        super().__init__()
        self.known = _Known(self.ATTR)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default) and args[0] in self.known:
            from torch.utils._python_dispatch import _disable_current_modes

            with _disable_current_modes():  # the fake mode below would fake the real copy again
                return self.known[args[0]].item()
        out = func(*args, **kwargs)
        if self._candidate(args, kwargs):
            try:
                real = self._real_call(func, args, kwargs)
            except _Unknown:
                return out
            except Exception:  # noqa: BLE001 - an op we cannot replay on CPU: simply not known
                return out
            for fake, value in zip(tree_leaves(out), tree_leaves(real)):
                if isinstance(fake, torch.Tensor) and isinstance(value, torch.Tensor) and fake.numel() <= self.MAX_NUMEL:
                    self.known.set(fake, value)
        return out

    def _candidate(self, args, kwargs) -> bool:
        from torch._subclasses.fake_tensor import FakeTensor

        found = False
        for a in tree_leaves((args, kwargs)):
            if isinstance(a, torch.Tensor):
                if a.numel() > self.MAX_NUMEL:
                    return False
                if a in self.known or not isinstance(a, FakeTensor):
                    found = True
                else:
                    return False
        return found

    def _real_call(self, func, args, kwargs):
        from torch.utils._python_dispatch import _disable_current_modes
        from torch.utils._pytree import tree_map

        def real(a):
            if isinstance(a, torch.Tensor):
                value = self.known.get(a)
                if value is not None:
                    return value
                from torch._subclasses.fake_tensor import FakeTensor

                if isinstance(a, FakeTensor):
                    raise _Unknown
                return a.detach().cpu()
            if isinstance(a, torch.device):
                return torch.device("cpu")
            return a

        with _disable_current_modes():  # everything here runs for real on the CPU
            r_args = tree_map(real, args)
            r_kwargs = {k: (torch.device("cpu") if k == "device" else tree_map(real, v)) for k, v in kwargs.items()
                        if k not in ("pin_memory",)}
            return func(*r_args, **r_kwargs)


class _Unknown(Exception):
    pass


class _Known:
    """``tensor in known`` / ``known[tensor]`` / ``known.get``: the host value stored on the tensor itself."""

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def __contains__(self, tensor) -> bool:
        return getattr(tensor, self.attr, None) is not None

    def __getitem__(self, tensor):
        return getattr(tensor, self.attr)

    def get(self, tensor, default=None):
        return getattr(tensor, self.attr, default)

    def set(self, tensor, value) -> None:
        setattr(tensor, self.attr, value)
