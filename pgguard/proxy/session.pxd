# C types for session.py when Cython compiles it (setup.py); the .py stays the source.
#
# Session and the FIFO entries become extension types: their attributes are C struct fields
# (no instance dict), and the per-message methods below are called from C within the module.
# A new attribute of Session must be declared here too, or the compiled build fails.
cimport cython

from pgguard.observability.audit cimport AuditSink
from pgguard.observability.tally cimport Tally, TallyHistogram
from pgguard.protocol.framing cimport FrameHandler, Framer
from pgguard.proxy._clock cimport monotonic
from pgguard.proxy._io cimport send_some

# Module constants as C integers (not looked up, not boxed, where they are compared).
cdef int K_QUERY, K_PARSE, K_BIND, K_EXEC, K_SYNC, K_CLOSE, K_DESCRIBE_S, K_DESCRIBE_P
cdef int STARTUP, CONNECTING, AUTH, READY, CLOSED
cdef tuple _BYTES


@cython.locals(first=Py_ssize_t, i=Py_ssize_t, rows=cython.longlong, scale=cython.longlong,
               ch=cython.uchar)
cpdef object _tag_rows(bytes buf, Py_ssize_t start, Py_ssize_t end)

cpdef Py_ssize_t _string_end(bytes buf, Py_ssize_t i, Py_ssize_t end) except? -2

@cython.locals(i=Py_ssize_t)
cpdef bint _same_name(bytes buf, Py_ssize_t start, Py_ssize_t end, bytes name) except? -1

cdef Py_ssize_t _length(bytes buf, Py_ssize_t pos) except? -1

@cython.locals(n=Py_ssize_t)
cpdef bint _send(int fd, bytes data, object buffered, object write) except -1
@cython.locals(t=_Tracked)
cpdef _Tracked _track(_Tracked t, int kind, object c, object decision, object rule, object stepup_event)


cdef class Session


@cython.final
cdef class _Fifo:
    cdef list _items
    cdef Py_ssize_t _first
    cdef Py_ssize_t _end

    cpdef void append(self, object e) except *
    cpdef void appendleft(self, object e) except *
    cpdef object head(self)
    @cython.locals(first=Py_ssize_t)
    cpdef object popleft(self)
    cpdef void clear(self) except *
    cpdef bint nonempty(self)


@cython.final
cdef class _Allowed:
    cdef public object classification
    cdef public object epoch
    cdef public object rule
    cdef public bint sensitive
    cdef public Tally tally
    cdef public bint plain
    cdef public tuple family


cdef class _Side:
    cdef Session _s
    cdef bint _client


cdef class _Frames(FrameHandler):
    cdef public Session session
    cdef public bint server


cdef class _Entry:
    cdef public int kind


# The shared entries of the kinds that need nothing more (C globals: no lookup per message).
cdef _Entry _E_QUERY, _E_BIND, _E_EXEC, _E_SYNC, _E_CLOSE, _E_DESCRIBE_S, _E_DESCRIBE_P


cdef class _Marked(_Entry):
    cdef public bytes error


# (No freelist: Cython keeps those for base types only, and this is an _Entry.)
@cython.no_gc  # it refers to nothing that refers back to it: not tracked by the collector
cdef class _Tracked(_Entry):
    cdef public object classification
    cdef public object decision
    cdef public object rule
    cdef public object stepup_event
    cdef public double started
    cdef public double ended
    cdef public object rows
    cdef public object error
    cdef public bint resets_encoding
    cdef public tuple family


cdef class _ParseEntry(_Entry):
    cdef public bytes name


cdef class Session:
    cdef public object ctx
    cdef public str id
    cdef public str client_addr
    cdef public bint tls
    cdef public str user
    cdef public str database
    cdef public int state
    cdef public object client
    cdef public object server
    cdef public object _write_client
    cdef public object _write_server
    cdef public object _client_buffered
    cdef public object _server_buffered
    cdef public int _client_fd
    cdef public int _server_fd
    cdef public bint _client_queued
    cdef public bint _server_queued
    cdef public bytes txn_status
    cdef public object done
    cdef public bytes _startup_buf
    cdef public object _refusal
    cdef public bytes _pending_client
    cdef public int _client_minor
    cdef public bint _owe_negotiate
    cdef public bint _password_exchanged
    cdef public object _real_key
    cdef public object _our_pid
    cdef public dict _params
    cdef public str _encoding
    cdef public _Fifo _fifo
    cdef public _Fifo _done
    cdef public _Tracked _spare
    cdef public TallyHistogram _histogram
    cdef public AuditSink _audit
    cdef public dict _statements
    cdef public object _stmt_epoch
    cdef public set _stale
    cdef public dict _portals
    cdef public set _running
    cdef public object _unnamed
    cdef public bint _unnamed_running
    cdef public bytes _bind_name
    cdef public dict _allowed
    cdef public _Allowed _last_allowed
    cdef public object _enc_saved
    cdef public object _scs_saved
    cdef public bint _settle_at_z
    cdef public object _facts
    cdef public object _held
    cdef public object _hold_task
    cdef public object _offload
    cdef public object _offload_task
    cdef public object _cache
    cdef public list _epoch_cell
    cdef public list _guard_epoch
    cdef public bint _client_copy_open
    cdef public list _paused
    cdef public set _tasks
    cdef public bint _shutting_down
    cdef public object _startup_timer
    cdef public Framer _cframer
    cdef public Framer _sframer

    cpdef object client_data(self, object data)
    cpdef object server_data(self, object data)
    @cython.locals(framer=Framer, n=Py_ssize_t, length=Py_ssize_t, e=Py_ssize_t,
                   nul=Py_ssize_t, described=bint, a=_Allowed, t=_Tracked, fifo=_Fifo)
    cpdef bint _fast_request(self, bytes data) except -1
    @cython.locals(framer=Framer, n=Py_ssize_t, length=Py_ssize_t, pos=Py_ssize_t,
                   tag=Py_ssize_t, z=Py_ssize_t, max_len=Py_ssize_t, first=Py_ssize_t,
                   size=Py_ssize_t, items=list, t=_Tracked, fifo=_Fifo)
    cpdef bint _fast_reply(self, bytes data) except -1
    @cython.locals(nul=Py_ssize_t, nul2=Py_ssize_t, running=set, fifo=_Fifo)
    cpdef object _on_client_frame(self, int typ, bytes buf, Py_ssize_t start, Py_ssize_t end)
    @cython.locals(a=_Allowed, tally=Tally)
    cpdef object _decide(self, int kind, object c, object text, object portal=*)
    @cython.locals(t=_Tracked)
    cpdef void _forwarded(self, int kind, object c, str decision, object rule,
                          object stepup_event, object text, object portal,
                          _Allowed allowed) except *
    @cython.locals(hk=int, t=_Tracked, fifo=_Fifo, e=_Entry, head=_Entry, p=_ParseEntry,
                   marked=_Marked)
    cpdef object _on_server_frame(self, int typ, bytes buf, Py_ssize_t start, Py_ssize_t end)
    @cython.locals(now=double)
    cpdef void _finished(self, _Tracked t) except *
    cpdef void _set_running(self, bytes portal, bint running) except *
    cpdef void no_direct_sends(self, bint client_side) except *
    @cython.locals(t=_Tracked, histogram=TallyHistogram, audit=AuditSink, done=_Fifo)
    cpdef void _report_done(self) except *
