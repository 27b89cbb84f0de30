"""kernelwatch: classify depthwise-convolution kernels into DoG-family patterns."""

__version__ = "0.1.0"
