# cython: language_level=3, boundscheck=False, wraparound=False
"""The usual statement events waiting for the audit writer, as C data: _usual.py is the
reference (what each method does), this is the same with one C struct per event, so that
emit_usual() on the event loop makes no Python object (no tuple, no float) and the writer's C
line maker reads the values as they are.

Emitters and the writer hold the GIL while they call these methods; none of them runs Python
code (dropping a reference here frees at most a tuple of bytes), so each is one step for every
other thread."""

cimport cython
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.ref cimport Py_INCREF, Py_XDECREF, PyObject

MAX_ROWS = (1 << 63) - 1


@cython.final
cdef class UsualEvents:
    """Events in the order added: (template parts, duration, rows, ts)."""

    def __dealloc__(self):
        self._release()
        PyMem_Free(self.items)
        self.items = NULL

    cdef void _release(self) noexcept:
        cdef Py_ssize_t i, n = self.n
        self.n = 0
        for i in range(n):
            Py_XDECREF(self.items[i].parts)
            self.items[i].parts = NULL

    cdef int _grow(self) except -1:
        cdef Py_ssize_t cap = 2 * self.cap if self.cap else 512
        cdef Usual *items = <Usual *>PyMem_Realloc(self.items, cap * sizeof(Usual))
        if items == NULL:
            raise MemoryError()
        self.items = items
        self.cap = cap
        return 0

    cpdef bint add(self, tuple parts, double duration, object rows, double ts) except -1:
        """Add one event; False (nothing added) when `rows` is not a count that fits a C long
        long: the sink chains that event itself."""
        cdef int overflow = 0
        cdef long long count
        cdef Usual *e
        if type(rows) is not int or parts is None:  # (a tuple or None: the argument's type)
            return False
        count = PyLong_AsLongLongAndOverflow(rows, &overflow)
        if overflow or count < 0:
            return False
        if self.n == self.cap:
            self._grow()
        e = &self.items[self.n]
        Py_INCREF(parts)
        e.parts = <PyObject *>parts
        e.duration = duration
        e.rows = count
        e.ts = ts
        self.n += 1
        return True

    cpdef void take(self, UsualEvents into) except *:
        """Move every event, in order, to `into` (what it held is dropped; into is self: no
        change): the two swap their arrays, so both keep the room they have grown to."""
        if into is None:
            raise TypeError("take() needs a UsualEvents")
        if into is self:
            return
        cdef Usual *items = into.items
        cdef Py_ssize_t cap = into.cap
        into._release()
        into.items, into.n, into.cap = self.items, self.n, self.cap
        self.items, self.n, self.cap = items, 0, cap

    def event(self, Py_ssize_t i):
        if not 0 <= i < self.n:
            raise IndexError("no such event")
        cdef Usual *e = &self.items[i]
        return (<object>e.parts, e.duration, e.rows, e.ts)

    def ts(self, Py_ssize_t i):
        if not 0 <= i < self.n:
            raise IndexError("no such event")
        return self.items[i].ts

    def clear(self):
        self._release()

    def __len__(self):
        return self.n
