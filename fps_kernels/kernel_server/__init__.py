"""The bridge between a kernel's ZMQ sockets and the browsers' WebSockets."""
