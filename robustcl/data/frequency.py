"""AdvCL's high-frequency view: the image with every spatial frequency inside a radius removed."""

from __future__ import annotations

import torch


def low_frequency_mask(height: int, width: int, radius: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool ``[H, W]``: True where a centre-shifted spectrum bin lies strictly within ``radius`` of the centre.

    The centre is (H/2, W/2), where ``fftshift`` puts the zero frequency, as in the authors' ``mask_radial``.
    """
    rows = torch.arange(height, device=device, dtype=torch.float32)[:, None] - height / 2
    cols = torch.arange(width, device=device, dtype=torch.float32)[None, :] - width / 2
    return rows.square() + cols.square() < radius**2


def high_frequency(images: torch.Tensor, radius: float) -> torch.Tensor:
    """Per-channel 2-D FFT, zero the bins within ``radius`` of the centre, inverse FFT, real part.

    ``images``: float ``[N, C, H, W]``. The result is not clamped: it has (nearly) zero mean and negative values,
    and goes to the model as it is.
    """
    h, w = images.shape[-2:]
    keep = ~low_frequency_mask(h, w, radius, images.device)
    spectrum = torch.fft.fftshift(torch.fft.fft2(images.float()), dim=(-2, -1))
    spectrum = spectrum * keep
    return torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real.to(images.dtype)
