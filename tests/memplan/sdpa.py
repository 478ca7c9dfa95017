"""Scaled-dot-product attention as a CUDA build runs it, for traces on a machine without a GPU.

Without a GPU, ``torch.nn.functional.scaled_dot_product_attention`` on (fake) CUDA
tensors cannot ask the device which fused kernel to use and falls back to the
math kernel, which materialises the full score matrix. On a CUDA machine the
fused kernels run instead: flash attention for fp16/bf16 without a mask and head
size <= 256, else the memory-efficient kernel. :func:`cuda_kernels` makes the
call pick the same kernel for CUDA tensors (their outputs and log-sum-exp buffers
are what the trace then counts); CPU tensors take PyTorch's own path.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

_ORIGINAL = F.scaled_dot_product_attention


def _cuda_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if q.device.type != "cuda" or dropout_p != 0.0 or enable_gqa:
        return _ORIGINAL(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                         enable_gqa=enable_gqa)
    if attn_mask is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 \
            and q.shape[-1] == v.shape[-1]:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)[0]
    bias = attn_mask
    if bias is not None and bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=q.dtype, device=q.device).masked_fill_(~bias, float("-inf"))
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, False, 0.0, is_causal, scale=scale)[0]


@contextlib.contextmanager
def cuda_kernels():
    """Within the block, SDPA on CUDA tensors takes the fused kernel a CUDA build would take."""
    F.scaled_dot_product_attention = _cuda_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _ORIGINAL
