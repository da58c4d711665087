"""The kernel side: wire format, signing, ZMQ sockets, kernelspecs and kernel processes."""
