"""The kernel side: wire format, signing, the kernel channel (ZMQ sockets, checks, kernel_info
handshake), server-side execution, kernelspecs and kernel processes."""
