"""Kernels that outlive a server restart (issue 12): the server's record of its kernels and
sessions, the lock that lets one server at a time hold them, adopted kernel processes, their
log files, and the optional keeper process that holds a kernel's output while no server is
attached. Self-contained: nothing here imports the server."""
