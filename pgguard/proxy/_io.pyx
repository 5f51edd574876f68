"""send() as a C function, for the compiled session (session.pxd cimports it): a reply goes
to the peer's socket in one system call, without the layers of a transport's write(). _io.py
is the same for pure Python (an extension module is imported before a .py of the same name)."""

from libc.errno cimport EINTR, errno

cdef extern from *:
    """
    #include <sys/socket.h>
    #ifndef MSG_NOSIGNAL  /* not everywhere; Python ignores SIGPIPE anyway */
    #define MSG_NOSIGNAL 0
    #endif
    """
    ssize_t send(int fd, const void *buf, size_t n, int flags) nogil
    enum:
        MSG_DONTWAIT
        MSG_NOSIGNAL


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
