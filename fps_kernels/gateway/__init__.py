"""Kernels in a Jupyter Kernel Gateway or Enterprise Gateway: HTTP client, WebSocket bridge."""
