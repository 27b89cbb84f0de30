"""DoG initialisation of depthwise convolutions (appendix F of the paper).

>>> import torch
>>> from torch import nn
>>> model = dog_(nn.Sequential(nn.Conv2d(8, 8, 5, padding=2, groups=8)), seed=0)
>>> round(model[0].weight.std().item() * 5 * 3**0.5, 4)  # std of the default init: 1 / (5 * sqrt(3))
1.0
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from kernelwatch import patterns
from kernelwatch.errors import KernelWatchError
from kernelwatch.extraction import is_depthwise

logger = logging.getLogger("kernelwatch")

#: Shares of appendix F: 45% on-centre, 10% off-centre, 15% crosses (split evenly between on
#: and off), 20% first derivatives and the remaining 10% second derivatives.
DEFAULT_PROPORTIONS: dict[str, float] = {
    "on-centre": 0.45,
    "off-centre": 0.10,
    "on-cross": 0.075,
    "off-cross": 0.075,
    "first-derivative": 0.20,
    "second-derivative": 0.10,
}


def dog_(
    model: nn.Module,
    proportions: Mapping[str, float] | None = None,
    *,
    seed: int | None = None,
    noise: float = 0.0,
) -> nn.Module:
    """Initialise every depthwise conv of ``model`` in place with DoG-family patterns; return it.

    Each output channel gets one pattern from :func:`kernelwatch.patterns.generate_mixture`,
    families drawn by ``proportions`` (default :data:`DEFAULT_PROPORTIONS`); biases are kept.
    Layers are visited in ``named_modules`` order from one generator seeded by ``seed``.
    Depthwise convs whose kernel is not square and odd (3..31) are skipped with a warning.
    """
    shares = patterns.check_proportions(DEFAULT_PROPORTIONS if proportions is None else proportions)
    depthwise = [(name, m) for name, m in model.named_modules() if is_depthwise(m)]
    if not depthwise:
        raise KernelWatchError(f"no depthwise convolution in {type(model).__name__} to initialise")
    rng = np.random.default_rng(seed)
    done = 0
    with torch.no_grad():
        for name, conv in depthwise:
            kh, kw = conv.kernel_size
            if kh != kw or kh % 2 == 0 or not patterns.MIN_KERNEL_SIZE <= kh <= patterns.MAX_KERNEL_SIZE:
                logger.warning(
                    "dog_: skipping depthwise conv %r: kernel %dx%d is not square and odd in [%d, %d]",
                    name, kh, kw, patterns.MIN_KERNEL_SIZE, patterns.MAX_KERNEL_SIZE,
                )
                continue
            kernels, _ = patterns.generate_mixture(conv.out_channels, kh, shares, rng=rng, noise=noise)
            weight = torch.from_numpy(kernels).to(torch.float64)
            # Match the spread of PyTorch's default init (kaiming_uniform, a=sqrt(5): U(-b, b),
            # b = 1/sqrt(fan_in), std = b/sqrt(3)) so activations stay in the range the rest of the
            # network (norms, residual scales, learning rate) expects. Scaling only, no centring:
            # the patterns' DC component (a DoG's positive sum) is part of the pattern.
            target = 1.0 / math.sqrt(conv.weight[0].numel()) / math.sqrt(3.0)
            weight *= target / weight.std()
            conv.weight.copy_(weight.reshape(conv.weight.shape))
            done += 1
    if not done:
        raise KernelWatchError("no depthwise convolution with a square odd kernel to initialise; see the warnings")
    return model
