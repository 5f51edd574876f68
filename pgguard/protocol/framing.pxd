# C types for framing.py when Cython compiles it (setup.py); the .py stays the source.
cimport cython

# The frame modes (framing.py): C constants where the scan loop compares them.
cdef int _SKIP, _INSPECT, _HEAD, _INVALID, _LATER


cdef class FrameHandler:
    cpdef object on_frame(self, int typ, bytes buf, Py_ssize_t start, Py_ssize_t end)


cdef class _Function(FrameHandler):
    cdef public object function


cdef class Framer:
    cdef readonly bytes _table  # set through _checked() only (no bounds checks when compiled)
    cdef public FrameHandler _handler
    cdef public Py_ssize_t _max_len
    cdef public Py_ssize_t _head_bytes
    cdef public bytearray _buf
    cdef public Py_ssize_t _need
    cdef public Py_ssize_t _stream_left
    cdef public Py_ssize_t _drop_left
    cdef public bint _held
    cdef public bytearray _held_buf
    # read without index checks when compiled: set only by the framer itself
    cdef readonly bytes _later_buf
    cdef readonly Py_ssize_t _later_start
    cdef readonly Py_ssize_t _later_end
    cdef readonly bytes _later_table

    @cython.locals(n=Py_ssize_t, pos=Py_ssize_t, flushed=Py_ssize_t, length=Py_ssize_t,
                   end=Py_ssize_t, seen=Py_ssize_t, mode=int, max_len=Py_ssize_t,
                   table=bytes, handler=FrameHandler)
    cdef object _scan(self, bytes data, object out)
    cpdef list feed(self, data)
    @cython.locals(n=Py_ssize_t)
    cpdef object relay(self, data)
    @cython.locals(pos=Py_ssize_t, end=Py_ssize_t, nxt=Py_ssize_t, buf=bytes, table=bytes,
                   handler=FrameHandler)
    cpdef void run_later(self) except *


cdef object _add(object out, bytes chunk)
cdef list _as_list(object out)
