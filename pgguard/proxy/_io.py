"""send_some(), as the compiled _io.pyx provides it: what the socket takes now of `data`."""

import os

__all__ = ["send_some"]


def send_some(fd: int, data: bytes) -> int:
    """The number of bytes of `data` the socket `fd` (non-blocking: the transport's own, dup'd)
    took without waiting, or -1 if none (full, or an error: the caller hands the rest to the
    transport, which meets the same error and closes the connection as it always does)."""
    try:
        return os.write(fd, data)
    except OSError:  # BlockingIOError (full), BrokenPipeError (SIGPIPE is ignored), ...
        return -1
