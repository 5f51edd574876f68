cpdef Py_ssize_t send_some(int fd, bytes data) except -2
