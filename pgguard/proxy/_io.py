"""send_some() and recv_some(), as the compiled _io.pyx provides them: what the socket takes now
of `data`, and what it has now."""

import os

__all__ = ["recv_some", "send_some"]

RECV_SIZE = 262144  # as much as one read of uvloop's transports


def send_some(fd: int, data: bytes) -> int:
    """The number of bytes of `data` the socket `fd` (non-blocking: the transport's own, dup'd)
    took without waiting, or -1 if none (full, or an error: the caller hands the rest to the
    transport, which meets the same error and closes the connection as it always does)."""
    try:
        return os.write(fd, data)
    except OSError:  # BlockingIOError (full), BrokenPipeError (SIGPIPE is ignored), ...
        return -1


def recv_some(fd: int) -> bytes | None:
    """What the socket `fd` (non-blocking, as above) has now: the bytes (up to 256 KiB), b""
    at the end of the stream, None if it has nothing yet; OSError for an error (a reset)."""
    try:
        return os.read(fd, RECV_SIZE)
    except BlockingIOError:  # (EINTR is retried by os.read)
        return None
