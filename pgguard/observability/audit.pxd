# C types for audit.py when Cython compiles it (setup.py); the .py stays the source.
#
# The statement event path (emit_statement, _chain_statement) runs once per statement on the
# event loop: the sink, its template cache and the duration texts are extension types, so
# their attributes are C fields. A new attribute of these classes must be declared here too,
# or the compiled build fails.
cimport cython

from pgguard.observability._usual cimport UsualEvents

cdef double WALL_OFFSET_SECONDS  # a C constant where _wall() compares it


cdef class _Durations:
    cdef public dict _cache

    cpdef bytes text(self, object seconds)


cdef class _Templates:
    cdef public dict cache
    cdef public object _derived
    cdef public dict _marks


cdef class AuditSink:
    cdef public object config
    cdef public object _on_error
    cdef public object _clock
    cdef public object _stdout
    cdef public object _queue
    cdef public Py_ssize_t _held
    cdef public Py_ssize_t _dropped_total
    cdef public Py_ssize_t _dropped_chained
    cdef public object _chain_lock
    cdef public object _file_id
    cdef public str _file_hash
    cdef public list _pending
    cdef public UsualEvents _usual
    cdef public UsualEvents _usual_batch
    cdef public bint _idle
    cdef public bint _healthy
    cdef public Py_ssize_t _errors
    cdef public bint _closed
    cdef public object _thread
    cdef public object _file
    cdef public object _last_id
    cdef public object _ts_sec
    cdef public str _ts_prefix
    cdef public object _derived
    cdef public _Templates _templates
    cdef public _Durations _durations
    cdef public object _lines
    cdef public str _last_hash
    cdef public double _last_fsync
    cdef public bint _dirty
    cdef public bint _needs_reopen
    cdef public object _size
    cdef public object last_error
    cdef public Py_ssize_t _max_pending
    cdef public double _wall_offset
    cdef public double _offset_at

    cdef bint _refused(self) except -1
    @cython.locals(ts=double)
    cpdef void emit_usual(self, tuple parts, double duration, object rows,
                          double now=*) except *
    @cython.locals(at=double, wall=double)
    cdef double _wall(self, double mono) except? -1.0
    @cython.locals(parts=tuple, hit=tuple)
    cpdef void emit_statement(self, object session, object user, object client_addr,
                              object classification, object decision, object rule,
                              object duration, object rows=*, object error=*,
                              object stepup_event=*, double now=*) except *
    @cython.locals(parts=tuple, hit=tuple, has_rows=bint, has_error=bint, has_stepup=bint,
                   body=bytes)
    cpdef bytes _chain_statement(self, object ts, tuple args)
    @cython.locals(micros=cython.longlong, sec=cython.longlong, us=cython.longlong)
    cpdef str _format_ts(self, object ts)
