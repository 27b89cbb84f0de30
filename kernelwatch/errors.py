"""The one exception kernelwatch raises for bad input."""


class KernelWatchError(ValueError):
    """Bad input: a model without depthwise convolutions, a corrupt checkpoint, an unsupported size."""
