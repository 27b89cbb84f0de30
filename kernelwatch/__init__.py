"""kernelwatch: classify depthwise-convolution kernels into DoG-family patterns.

>>> import kernelwatch as kw
>>> kw.CLUSTERS[:2]
('on-centre', 'off-centre')

The public API is imported lazily, so ``import kernelwatch`` alone does not import torch
(the TensorBoard plugin shares torch-free modules of this package).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kernelwatch._config import CLUSTERS, INVALID, PAPER_THRESHOLDS, UNCLUSTERED
from kernelwatch.errors import KernelWatchError

__version__ = "0.1.0"

_LAZY = {
    "extract_depthwise": "kernelwatch.extraction",
    "DepthwiseKernels": "kernelwatch.extraction",
    "Spectrum": "kernelwatch.spectrum",
    "ClassificationResult": "kernelwatch.classification",
    "analyze": "kernelwatch.analysis",
    "AnalysisReport": "kernelwatch.analysis",
    "LayerReport": "kernelwatch.analysis",
    "KernelWatch": "kernelwatch.monitor",
    "FirstLayerReport": "kernelwatch.first_layer",
    "PatchPCA": "kernelwatch.first_layer",
    "analyze_first_layer": "kernelwatch.first_layer",
    "first_layer_report": "kernelwatch.first_layer",
    "find_stem": "kernelwatch.first_layer",
    "image_patches": "kernelwatch.first_layer",
    "patch_pca": "kernelwatch.first_layer",
    "prior_pca": "kernelwatch.first_layer",
    "SizeApproach": "kernelwatch.kernel_sizes",
}
_SUBMODULES = ("patterns", "init")

__all__ = ["CLUSTERS", "INVALID", "PAPER_THRESHOLDS", "UNCLUSTERED", "KernelWatchError", *_LAZY, *_SUBMODULES]

if TYPE_CHECKING:
    from kernelwatch import init, patterns
    from kernelwatch.analysis import AnalysisReport, LayerReport, analyze
    from kernelwatch.classification import ClassificationResult
    from kernelwatch.extraction import DepthwiseKernels, extract_depthwise
    from kernelwatch.first_layer import (
        FirstLayerReport,
        PatchPCA,
        analyze_first_layer,
        find_stem,
        first_layer_report,
        image_patches,
        patch_pca,
        prior_pca,
    )
    from kernelwatch.kernel_sizes import SizeApproach
    from kernelwatch.spectrum import Spectrum


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"kernelwatch.{name}")
    raise AttributeError(f"module 'kernelwatch' has no attribute {name!r}")
