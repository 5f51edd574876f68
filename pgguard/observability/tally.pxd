# C types for tally.py when Cython compiles it (setup.py); the .py stays the source.
#
# A new attribute of these classes must be declared here too, or the compiled build fails.
cimport cython


cdef class Tally:
    cdef public double value


cdef class TallyHistogram:
    cdef public tuple bounds
    cdef long long[::1] _counts
    cdef public double sum

    @cython.locals(i=Py_ssize_t, bound=double)
    cpdef void observe(self, double amount) except *
