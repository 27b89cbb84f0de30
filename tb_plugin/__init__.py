"""The KernelWatch TensorBoard plugin (see docs/plugin.md); imports no torch."""
