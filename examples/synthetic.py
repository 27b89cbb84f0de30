"""Synthetic data and a small depthwise CNN shared by the examples (CPU, no downloads).

The images are procedurally drawn shapes (disc, ring, bars, cross, square outline) at random
positions, sizes, polarities and tints under Gaussian noise. Telling them apart takes
centre-surround, edge and line detectors, so DoG-family kernels have a reason to emerge.
"""

from __future__ import annotations

import torch
from torch import nn

#: Class names, in label order.
SHAPES = ("disc", "ring", "horizontal bar", "vertical bar", "cross", "square")


def shapes_dataset(n: int, size: int = 32, seed: int = 0, noise: float = 0.35) -> torch.utils.data.TensorDataset:
    """``n`` RGB images ``[3, size, size]`` of random shapes, labelled by shape."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(SHAPES), (n,), generator=gen)
    coords = torch.arange(size, dtype=torch.float32)
    y, x = coords.view(1, size, 1), coords.view(1, 1, size)
    cx, cy = (torch.rand(2, n, 1, 1, generator=gen) * 0.5 + 0.25) * size
    radius = (torch.rand(n, 1, 1, generator=gen) * 0.15 + 0.15) * size
    width = radius / 4
    dx, dy = (x - cx).abs(), (y - cy).abs()
    dist = (dx**2 + dy**2).sqrt()
    box = torch.maximum(dx, dy)
    hbar, vbar = (dy < width) & (dx < 2 * radius), (dx < width) & (dy < 2 * radius)
    masks = torch.stack(
        [
            dist < radius,
            (dist - radius).abs() < width,
            hbar,
            vbar,
            (hbar | vbar) & (box < radius * 1.5),
            (box < radius) & (box > radius - width),
        ]
    )
    shape = masks[labels, torch.arange(n)].float()
    # Random polarity and tint, so both on- and off-type detectors are useful.
    polarity = torch.where(torch.rand(n, 1, 1, 1, generator=gen) < 0.5, -1.0, 1.0)
    tint = torch.rand(n, 3, 1, 1, generator=gen) * 0.5 + 0.5
    images = polarity * tint * shape.unsqueeze(1) + noise * torch.randn(n, 3, size, size, generator=gen)
    return torch.utils.data.TensorDataset(images, labels)


class Block(nn.Module):
    """ConvNeXt-style block: depthwise k x k conv, norm, pointwise MLP, residual."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.norm = nn.BatchNorm2d(channels)
        self.mlp = nn.Sequential(nn.Conv2d(channels, 2 * channels, 1), nn.GELU(), nn.Conv2d(2 * channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(self.conv_dw(x)))


class DepthwiseNet(nn.Module):
    """A small classifier: 7x7 depthwise convs at 1/2 and 5x5 at 1/4 of the input resolution."""

    def __init__(self, num_classes: int = len(SHAPES), width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 4, stride=2, padding=1), nn.BatchNorm2d(width), nn.GELU())
        self.stages = nn.Sequential(
            Block(width, 7),
            Block(width, 7),
            nn.Conv2d(width, 2 * width, 2, stride=2),
            Block(2 * width, 5),
            Block(2 * width, 5),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))
