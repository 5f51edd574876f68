cpdef double monotonic() noexcept nogil
