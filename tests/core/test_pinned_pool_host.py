"""``compat.host_pinned_allocator``: the store's host buffers under the host's pinned-memory budget.

Unlike the rest of tests/core this boots the host (``comfy_host``), because the
detection lives in the pack's ``nodes/compat.py``; the host's ``model_management``
is replaced by stand-ins for the three kinds of host it must recognise.
"""
import sys
from types import SimpleNamespace

import pytest
import torch


@pytest.fixture
def compat(comfy_host):
    return next(m for n, m in sys.modules.items() if n.endswith("nodes.compat"))


def host_mm(allowed=("Tensor", "Parameter", "QuantizedTensor"), max_bytes=8192, total=0):
    """A model_management stand-in: ComfyUI's pin_memory/unpin_memory bookkeeping, without CUDA."""
    mm = SimpleNamespace(MAX_PINNED_MEMORY=max_bytes, TOTAL_PINNED_MEMORY=total, PINNED_MEMORY={},
                         PINNING_ALLOWED_TYPES=set(allowed))

    def pin_memory(tensor):
        size = tensor.numel() * tensor.element_size()
        if type(tensor).__name__ not in mm.PINNING_ALLOWED_TYPES or mm.TOTAL_PINNED_MEMORY + size > mm.MAX_PINNED_MEMORY:
            return False
        mm.PINNED_MEMORY[tensor.data_ptr()] = size
        mm.TOTAL_PINNED_MEMORY += size
        return True

    def unpin_memory(tensor):
        mm.TOTAL_PINNED_MEMORY -= mm.PINNED_MEMORY.pop(tensor.data_ptr())
        return True

    mm.pin_memory, mm.unpin_memory = pin_memory, unpin_memory
    return mm


ON = SimpleNamespace(disable_pinned_memory=False)


def test_newer_host_pins_through_its_own_budget(compat):
    mm = host_mm(max_bytes=6000)
    allocator = compat.host_pinned_allocator(mm, ON)
    a = allocator.allocate((1024,), torch.float32)  # 4096 B: registered by the host
    b = allocator.allocate((1024,), torch.float32)  # over the host's budget: pageable, noted
    assert a.pinned and a.registered and not b.pinned
    assert mm.TOTAL_PINNED_MEMORY == 4096 and allocator.notes
    allocator.free(a)
    assert mm.TOTAL_PINNED_MEMORY == 0


def test_host_that_pins_only_its_parameters_leaves_us_its_remaining_budget(compat):
    mm = host_mm(allowed=("Parameter", "QuantizedTensor"), max_bytes=10000, total=4000)
    allocator = compat.host_pinned_allocator(mm, ON)
    assert allocator._register is None and allocator._remaining() == 6000
    mm.TOTAL_PINNED_MEMORY = 9000  # the host pinned more weights meanwhile
    assert allocator._remaining() == 1000


def test_disable_pinned_memory_and_hosts_without_a_budget(compat):
    off = compat.host_pinned_allocator(host_mm(), SimpleNamespace(disable_pinned_memory=True))
    assert off.disabled == "--disable-pinned-memory" and not off.allocate((4,), torch.float32).pinned
    assert compat.host_pinned_allocator(host_mm(max_bytes=-1), ON).disabled  # pinning off on this host
    assert compat.host_pinned_allocator(SimpleNamespace(), ON) is None  # no pinned budget: store default


def test_the_running_host_is_recognised(compat):
    """On this CPU machine the host keeps pinning off (not NVIDIA/AMD) or has no budget at all."""
    allocator = compat.host_pinned_allocator()
    assert allocator is None or allocator.disabled
