"""Image/video fidelity metrics of an accelerated output against its uncached reference.

Plain-torch PSNR and SSIM so quality checks run offline in CI.  ``a`` is the output
under test, ``b`` the reference; both ``[..., H, W]`` with any leading dims (frames,
channels, batch).  Computed in float64 on CPU (float32 elsewhere).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.device.type == "cpu" else torch.float32


def _data_range(reference: torch.Tensor, data_range: float | None) -> float:
    if data_range is not None:
        if data_range <= 0:
            raise ValueError(f"data_range must be > 0, got {data_range}")
        return float(data_range)
    span = float((reference.max() - reference.min()).item())
    # A constant reference has no range; fall back to 1.0 (images in [0, 1]).
    return span if span > 0 else 1.0


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(R^2 / mean((a-b)^2))``.

    a, b: same shape.  data_range R defaults to ``b.max() - b.min()`` of the
    reference (1.0 if ``b`` is constant); pass 1.0 / 255.0 for fixed-range images.
    Returns ``inf`` for identical inputs.
    """
    if a.shape != b.shape:
        raise ValueError(f"psnr: shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    dtype = _work_dtype(b)
    r = _data_range(b.to(dtype), data_range)
    mse = float(((a.to(dtype) - b.to(dtype)) ** 2).mean().item())
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(r * r / mse)


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2.0
    g = torch.exp(-(coords ** 2) / (2.0 * sigma * sigma))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float | None = None) -> float:
    """Mean structural similarity (Wang et al. 2004) over all 2-D planes.

    a, b: same shape ``[..., H, W]``; each ``H x W`` plane is scored separately and the
    SSIM maps are averaged over planes and positions.  Gaussian window 11x11 with
    sigma 1.5, "valid" positions only (no padding), K1=0.01, K2=0.03.  For planes
    smaller than 11 pixels the window shrinks to the largest odd size <= min(H, W)
    with sigma scaled by size/11.  data_range as in ``psnr``.  Returns a value in
    [-1, 1]; 1.0 for identical inputs.
    """
    if a.shape != b.shape:
        raise ValueError(f"ssim: shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.dim() < 2:
        raise ValueError(f"ssim needs [..., H, W] tensors, got shape {tuple(a.shape)}")
    dtype = _work_dtype(b)
    h, w = a.shape[-2:]
    x = a.to(dtype).reshape(-1, 1, h, w)
    y = b.to(dtype).reshape(-1, 1, h, w)
    r = _data_range(y, data_range)

    size = min(SSIM_WINDOW, h, w)
    if size % 2 == 0:
        size -= 1
    sigma = SSIM_SIGMA * size / SSIM_WINDOW
    g = _gaussian_window(size, sigma, dtype, x.device)
    kernel_h = g.view(1, 1, size, 1)
    kernel_w = g.view(1, 1, 1, size)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, kernel_h), kernel_w)

    c1 = (SSIM_K1 * r) ** 2
    c2 = (SSIM_K2 * r) ** 2
    mu_x, mu_y = blur(x), blur(y)
    sigma_xx = blur(x * x) - mu_x * mu_x
    sigma_yy = blur(y * y) - mu_y * mu_y
    sigma_xy = blur(x * y) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)
    denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (sigma_xx + sigma_yy + c2)
    return float((numerator / denominator).mean().item())
