"""send() and recv() as C functions, for the compiled session (session.pxd cimports them): a
reply goes to the peer's socket in one system call, without the layers of a transport's
write(), and what a peer sent is read the same way, without the layers of a transport's read
callback (the session's direct reads). _io.py is the same for pure Python (an extension module
is imported before a .py of the same name)."""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.errno cimport EAGAIN, EINTR, errno
from libc.string cimport strerror

cdef extern from *:
    """
    #include <sys/socket.h>
    #ifndef MSG_NOSIGNAL  /* not everywhere; Python ignores SIGPIPE anyway */
    #define MSG_NOSIGNAL 0
    #endif
    """
    ssize_t send(int fd, const void *buf, size_t n, int flags) nogil
    ssize_t recv(int fd, void *buf, size_t n, int flags) nogil
    enum:
        MSG_DONTWAIT
        MSG_NOSIGNAL

# What one recv() may read: as much as uvloop's transports read at once. One buffer for every
# socket: recv_some() holds the GIL from the system call until the bytes object is made, so no
# two callers ever use it at once.
cdef enum:
    RECV_SIZE = 262144
cdef char _recv_buf[RECV_SIZE]


cpdef Py_ssize_t send_some(int fd, bytes data) except -2:
    """Send what the socket takes now of `data`, never waiting: the number of bytes sent, or
    -1 if it took nothing (full, or an error: the caller hands the rest to the transport,
    which meets the same error and closes the connection as it always does)."""
    cdef ssize_t n
    while True:
        n = send(fd, <const char *>data, len(data), MSG_DONTWAIT | MSG_NOSIGNAL)
        if n >= 0:
            return n
        if errno != EINTR:
            return -1


cpdef object recv_some(int fd):
    """What the socket `fd` has now, never waiting: the bytes (up to 256 KiB), b"" at the end
    of the stream, None if it has nothing yet; OSError for an error (a reset)."""
    cdef ssize_t n
    cdef int code
    while True:
        n = recv(fd, _recv_buf, RECV_SIZE, MSG_DONTWAIT)
        if n > 0:
            return PyBytes_FromStringAndSize(_recv_buf, n)
        if n == 0:
            return b""
        code = errno
        if code == EAGAIN:  # (EWOULDBLOCK is the same number wherever pgguard runs)
            return None
        if code != EINTR:
            raise OSError(code, strerror(code).decode())
