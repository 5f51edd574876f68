"""The monotonic clock as a C function, for the compiled session (session.pxd cimports it):
time.monotonic() without a Python call or a float object per reading. _clock.py is the same
clock for pure Python (an extension module is imported before a .py of the same name)."""

from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec


cpdef double monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    # As CPython turns nanoseconds into seconds (_PyTime_AsSecondsDouble): the same double.
    return <double>(<long long>ts.tv_sec * 1000000000 + ts.tv_nsec) / 1e9
