"""PSNR / SSIM."""

import math

import pytest
import torch

from lightcache_core import psnr, ssim


def test_psnr_values():
    b = torch.zeros(4, 4)
    b[0, 0] = 1.0  # data range 1
    a = b + 0.125  # exactly representable, so the expected value is exact
    expected = 10 * math.log10(1 / 0.125**2)
    assert psnr(a, b) == pytest.approx(expected, rel=1e-12)
    assert math.isinf(psnr(b, b))
    assert psnr(a * 255, b * 255, data_range=255.0) == pytest.approx(expected, rel=1e-12)
    # constant reference: range falls back to 1.0
    assert psnr(torch.full((3, 3), 0.125), torch.zeros(3, 3)) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError):
        psnr(a, b[0])


def test_ssim_identity_and_ordering():
    torch.manual_seed(0)
    ref = torch.rand(2, 3, 32, 32)
    assert ssim(ref, ref) == pytest.approx(1.0, abs=1e-12)
    mild = ref + 0.02 * torch.randn_like(ref)
    strong = ref + 0.2 * torch.randn_like(ref)
    assert 1.0 > ssim(mild, ref) > ssim(strong, ref)
    assert ssim(1.0 - ref, ref) < -0.5  # anti-correlated structure, same mean
    # SSIM(-x, x) is high: luminance and structure terms are both negative.


def test_ssim_small_planes_and_shapes():
    torch.manual_seed(1)
    small = torch.rand(5, 6)  # smaller than the 11x11 window
    assert ssim(small, small) == pytest.approx(1.0, abs=1e-12)
    assert ssim(small + 0.1 * torch.randn(5, 6), small) < 1.0
    video = torch.rand(2, 4, 3, 16, 16)  # [B, T, C, H, W]
    noisy = video + 0.05 * torch.randn_like(video)
    per_plane = torch.tensor([ssim(noisy[i, j, k], video[i, j, k], data_range=1.0)
                              for i in range(2) for j in range(4) for k in range(3)], dtype=torch.float64)
    assert ssim(noisy, video, data_range=1.0) == pytest.approx(per_plane.mean().item(), rel=1e-9)
    with pytest.raises(ValueError):
        ssim(torch.rand(5), torch.rand(5))


def test_ssim_matches_closed_form_for_constant_shift():
    # Constant planes: sigma terms vanish, SSIM = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1).
    x = torch.full((16, 16), 0.5)
    y = torch.full((16, 16), 0.625)
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.5 * 0.625 + c1) / (0.25 + 0.625**2 + c1)
    assert ssim(x, y, data_range=1.0) == pytest.approx(expected, rel=1e-9)
