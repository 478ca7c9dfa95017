"""A stand-in for the store's CUDA call surface (``CudaStreamOps``) that runs on CPU and logs every call.

"Device" tensors are CPU tensors marked ``_on_device``; streams and events are
named objects whose calls land in ``Recorder.log`` as tuples, so a test can
check the order of allocations, waits and copies without a GPU.
"""
from __future__ import annotations

import contextlib

import torch


class FakeStream:
    def __init__(self, name: str, rec: "Recorder") -> None:
        self.name, self.rec = name, rec

    def wait_stream(self, other: "FakeStream") -> None:
        self.rec.log.append(("wait_stream", self.name, other.name))

    def wait_event(self, event: "FakeEvent") -> None:
        self.rec.log.append(("wait_event", self.name, event.name))

    def synchronize(self) -> None:
        self.rec.log.append(("synchronize", self.name))

    def __repr__(self) -> str:
        return f"<stream {self.name}>"


class FakeEvent:
    def __init__(self, rec: "Recorder", name: str) -> None:
        self.rec, self.name = rec, name
        self.synchronized = 0

    def record(self, stream: FakeStream) -> None:
        self.rec.log.append(("record", self.name, stream.name))

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        self.synchronized += 1
        self.rec.log.append(("event_synchronize", self.name))


class Recorder:
    def __init__(self) -> None:
        self.log: list[tuple] = []
        self.compute = FakeStream("compute", self)
        self.side = FakeStream("side", self)
        self._current = self.compute
        self._events = 0

    # the CudaStreamOps surface
    def current_stream(self) -> FakeStream:
        return self._current

    @contextlib.contextmanager
    def use(self, stream: FakeStream):
        previous, self._current = self._current, stream
        self.log.append(("enter", stream.name))
        try:
            yield
        finally:
            self._current = previous
            self.log.append(("exit", stream.name))

    def new_event(self) -> FakeEvent:
        self._events += 1
        return FakeEvent(self, f"e{self._events}")

    def empty(self, shape, dtype) -> torch.Tensor:
        self.log.append(("alloc", self._current.name, tuple(shape)))
        return self.device(torch.empty(shape, dtype=dtype))

    def to_device(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.is_on_device(tensor) and tensor.dtype == dtype:
            return tensor
        self.log.append(("alloc", self._current.name, tuple(tensor.shape)))
        return self.device(tensor.to(dtype))

    def is_on_device(self, tensor: torch.Tensor) -> bool:
        return getattr(tensor, "_on_device", False)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        kind = "h2d" if self.is_on_device(dst) else "d2h"
        self.log.append(("copy", kind, self._current.name))
        dst.copy_(src)

    def record_stream(self, tensor: torch.Tensor, stream: FakeStream) -> None:
        self.log.append(("record_stream", stream.name))

    # helpers for tests
    @staticmethod
    def device(tensor: torch.Tensor) -> torch.Tensor:
        tensor._on_device = True
        return tensor

    def kinds(self) -> list[str]:
        return [e[0] for e in self.log]
