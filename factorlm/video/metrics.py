"""Frame-quality metrics of video prediction: MSE, MAE and SSIM per frame.

SSIM (Wang, Bovik, Sheikh & Simoncelli 2004): with local statistics under a normalized gaussian
window w (side ``window``, standard deviation ``sigma``),

    μ_x = w * x,  σ_x² = w * x² − μ_x²,  σ_xy = w * (x·y) − μ_x·μ_y
    SSIM = (2μ_xμ_y + C1)(2σ_xy + C2) / ((μ_x² + μ_y² + C1)(σ_x² + σ_y² + C2)),
    C1 = (0.01·L)², C2 = (0.03·L)²,  L = data_range,

averaged over every window position that lies wholly inside the image (no padding, as the paper's
reference code), then over channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from factorlm.validate import check_int, check_real

__all__ = ["gaussian_window", "ssim", "FrameMetrics"]


def gaussian_window(size: int, sigma: float, *, dtype=torch.float64, device=None) -> Tensor:
    """The 1-D gaussian of ``size`` taps (odd), standard deviation ``sigma``, summing to 1."""
    size = check_int("window", size)
    if size % 2 == 0:
        raise ValueError(f"the SSIM window must be odd (it has a centre pixel), got {size}")
    check_real("sigma", sigma)
    x = torch.arange(size, dtype=dtype, device=device) - size // 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(x: Tensor, y: Tensor, *, window: int = 11, sigma: float = 1.5, data_range: float = 1.0) -> Tensor:
    """Mean SSIM of each image pair: x, y (N, C, H, W) -> (N,). H, W ≥ window."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two (N, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < window:
        raise ValueError(f"images of {x.shape[-2]}×{x.shape[-1]} are smaller than the SSIM window {window}")
    n, c, h, w = x.shape
    g = gaussian_window(window, sigma, dtype=x.dtype, device=x.device)

    def blur(z: Tensor) -> Tensor:  # separable: rows, then columns; every channel on its own
        z = z.reshape(n * c, 1, *z.shape[-2:])
        z = F.conv2d(z, g.view(1, 1, 1, -1))
        return F.conv2d(z, g.view(1, 1, -1, 1))

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return value.view(n, c, -1).mean(dim=(1, 2))


class FrameMetrics:
    """Sums of per-frame MSE, MAE and SSIM over sequences, for their means per frame.

    ``add(pred, truth)`` with (N, T, C, H, W) tensors; ``result()`` -> {"mse": [T floats], "mae":
    [...], "ssim": [...], "sequences": count, and their means over frames "mse_mean", ...}. MSE and
    MAE are per pixel; SSIM uses a window of ``min(11, the largest odd side that fits)``.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] | None = None
        self.count = 0

    def add(self, pred: Tensor, truth: Tensor) -> None:
        pred, truth = pred.detach().double().cpu(), truth.detach().double().cpu()
        n, t = truth.shape[:2]
        side = min(truth.shape[-2:])
        window = min(11, side if side % 2 else side - 1)
        diff = pred - truth
        frame_ssim = ssim(pred.flatten(0, 1), truth.flatten(0, 1), window=window).view(n, t)
        batch = {"mse": (diff ** 2).mean(dim=(2, 3, 4)).sum(0), "mae": diff.abs().mean(dim=(2, 3, 4)).sum(0),
                 "ssim": frame_ssim.sum(0)}
        self.sums = batch if self.sums is None else {k: self.sums[k] + v for k, v in batch.items()}
        self.count += n

    def result(self) -> dict:
        if not self.count:
            return {"sequences": 0}
        out: dict = {"sequences": self.count}
        for name, total in self.sums.items():
            per_frame = (total / self.count).tolist()
            out[name] = per_frame
            out[f"{name}_mean"] = math.fsum(per_frame) / len(per_frame)
        return out
