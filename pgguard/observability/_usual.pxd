# The C version of _usual.py (_usual.pyx), cimported by the compiled audit sink (audit.pxd) and
# the C line writer (_auditline.pyx).
cimport cython
from cpython.ref cimport PyObject


cdef struct Usual:
    PyObject *parts  # the template's parts, a tuple: a reference the array owns
    double duration
    long long rows
    double ts


@cython.final
cdef class UsualEvents:
    cdef Usual *items
    cdef Py_ssize_t n
    cdef Py_ssize_t cap

    cdef void _release(self) noexcept
    cdef int _grow(self) except -1
    cpdef bint add(self, tuple parts, double duration, object rows, double ts) except -1
    cpdef void take(self, UsualEvents into) except *
