"""The kernels plugin of jupyverse: kernelspecs, kernels, sessions and the kernel WebSocket."""

__version__ = "0.7.0"
