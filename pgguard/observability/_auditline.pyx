# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The line of the usual `statement` event, made in C: the one audit event per statement.

audit.py makes every line itself; for the statement event of a forwarded statement that
returned rows (no error, no step-up) it asks `StatementLines.line()` first, which writes the
same bytes as audit.py's own code without a Python object per value: the template's parts
(bytes, from `_Templates`) and the variable values (duration, id, prev, rows, ts) are copied
into the line in place, and SHA-256 is OpenSSL's, called directly. audit.py stays the
reference: `line()` returns None for any value outside the ranges written here, and audit.py
takes its own path then; tests/property/test_compiled.py checks that both give the same bytes.

setup.py builds this when a C compiler and OpenSSL's headers are there (libssl-dev); without
them audit.py runs as it is, only slower.
"""

import os

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeASCII
from libc.math cimport rint
from libc.string cimport memcpy
from libc.time cimport time_t, tm

from pgguard.observability._usual cimport Usual, UsualEvents


cdef extern from "<time.h>" nogil:
    tm *gmtime_r(const time_t *timep, tm *result)


cdef extern from "openssl/sha.h" nogil:
    ctypedef struct SHA256_CTX:
        pass
    int SHA256_Init(SHA256_CTX *c)
    int SHA256_Update(SHA256_CTX *c, const void *data, size_t n)
    int SHA256_Final(unsigned char *md, SHA256_CTX *c)


cdef enum:
    TS_LEN = 27      # 2025-01-31T12:00:00.123456Z
    PREFIX_LEN = 20  # 2025-01-31T12:00:00.
    HASH_TAIL = 76   # ,"hash":"<64 hex>"}\n, written over the body's closing }

cdef double MAX_MICROS = 253402300800000000.0  # 10000-01-01T00:00:00Z: four-digit years only
cdef double MAX_DURATION_US = 1e15  # below this, repr() of the duration is what _duration writes
cdef long long MAX_ID = 9223372036854775807  # the largest id line() takes (a long long)

cdef const char *_HEX = b"0123456789abcdef"


cdef inline Py_ssize_t _digits(char *out, unsigned long long v) noexcept nogil:
    """Decimal digits of v at out; their number."""
    cdef char tmp[20]
    cdef Py_ssize_t n = 0, i
    while True:
        tmp[n] = <char>(48 + v % 10)
        n += 1
        v //= 10
        if v == 0:
            break
    for i in range(n):
        out[i] = tmp[n - 1 - i]
    return n


cdef inline Py_ssize_t _digits_len(unsigned long long v) noexcept nogil:
    """How many decimal digits v has."""
    cdef Py_ssize_t n = 1
    while v >= 10:
        v //= 10
        n += 1
    return n


cdef inline void _fixed(char *out, long long v, int width) noexcept nogil:
    """v as exactly `width` digits, zero-padded."""
    cdef int i
    for i in range(width - 1, -1, -1):
        out[i] = <char>(48 + v % 10)
        v //= 10


cdef Py_ssize_t _duration(char *out, long long us) noexcept nogil:
    """repr(us / 1e6), the JSON of a statement's duration, for 0 <= us < 1e15: the decimal
    us·10⁻⁶ without trailing zeros (it is the shortest text of that float), in exponent form
    below 1e-4 as repr writes it (1.2e-05, 5e-06)."""
    cdef Py_ssize_t n
    cdef long long whole, frac
    cdef int width
    if us == 0:
        memcpy(out, b"0.0", 3)
        return 3
    if us < 100:  # 1e-06 .. 9.9e-05
        if us < 10:
            out[0] = <char>(48 + us)
            n = 1
            memcpy(out + n, b"e-06", 4)
        else:
            out[0] = <char>(48 + us // 10)
            n = 1
            if us % 10:
                out[1] = b'.'
                out[2] = <char>(48 + us % 10)
                n = 3
            memcpy(out + n, b"e-05", 4)
        return n + 4
    whole = us // 1000000
    frac = us % 1000000
    n = _digits(out, <unsigned long long>whole)
    out[n] = b'.'
    n += 1
    if frac == 0:
        out[n] = b'0'
        return n + 1
    width = 6
    while frac % 10 == 0:
        frac //= 10
        width -= 1
    _fixed(out + n, frac, width)
    return n + width


cdef bint _count(object value, long long *out):
    """A non-negative Python int that fits a long long (bool is not one)."""
    cdef int overflow = 0
    if type(value) is not int:
        return False
    out[0] = PyLong_AsLongLongAndOverflow(value, &overflow)
    return overflow == 0 and out[0] >= 0


cdef struct _Values:
    # One statement event's parts (pointers into the template's bytes, which the caller keeps
    # alive) and its values as C numbers and text.
    const char *parts[6]
    Py_ssize_t sizes[6]
    char dur_text[32]
    Py_ssize_t dur_len
    long long id
    long long rows
    long long micros
    Py_ssize_t size  # the line's length


cdef bint _values(_Values *v, object parts, double duration, object rows, double ts):
    """Fill `v` from one event's template parts and values, except its id; False when a value
    is outside what this writes (audit.py's own code makes that line)."""
    if not _count(rows, &v.rows):
        return False
    return _values_of(v, parts, duration, ts)


cdef bint _values_of(_Values *v, object parts, double duration, double ts):
    """_values() with `v.rows` set already (a count)."""
    cdef double dur_f, ts_f
    cdef Py_ssize_t i, size
    cdef object part
    if type(parts) is not tuple or len(parts) != 6:
        return False
    dur_f = rint(duration * 1e6)  # round(): half to even, as audit.py rounds
    ts_f = rint(ts * 1e6)
    if not (0.0 <= dur_f < MAX_DURATION_US and 0.0 <= ts_f < MAX_MICROS):
        return False  # NaN too
    v.micros = <long long>ts_f
    v.dur_len = _duration(v.dur_text, <long long>dur_f)
    size = 0
    for i in range(6):
        part = (<tuple>parts)[i]
        if type(part) is not bytes:
            return False
        v.parts[i] = PyBytes_AS_STRING(part)
        v.sizes[i] = PyBytes_GET_SIZE(part)
        size += v.sizes[i]
    if v.sizes[5] == 0 or v.parts[5][v.sizes[5] - 1] != b'}':
        return False
    v.size = size + v.dur_len + 64 + TS_LEN  # without the id's and the rows' digits
    return True


cdef class StatementLines:
    """Makes statement lines; keeps the timestamp text of the current second (events come
    many per second). Used under the audit sink's chain lock, like the rest of the chain."""

    cdef long long _second
    cdef char _prefix[PREFIX_LEN]
    cdef public str digest
    """The hash of the last line made (the next event's prev)."""

    def __cinit__(self):
        self._second = -1
        self.digest = None

    cdef bint _set_second(self, long long second) noexcept nogil:
        cdef time_t t = <time_t>second
        cdef tm parts
        if gmtime_r(&t, &parts) == NULL:
            return False
        _fixed(self._prefix, parts.tm_year + 1900, 4)
        self._prefix[4] = b'-'
        _fixed(self._prefix + 5, parts.tm_mon + 1, 2)
        self._prefix[7] = b'-'
        _fixed(self._prefix + 8, parts.tm_mday, 2)
        self._prefix[10] = b'T'
        _fixed(self._prefix + 11, parts.tm_hour, 2)
        self._prefix[13] = b':'
        _fixed(self._prefix + 14, parts.tm_min, 2)
        self._prefix[16] = b':'
        _fixed(self._prefix + 17, parts.tm_sec, 2)
        self._prefix[19] = b'.'
        self._second = second
        return True

    cdef Py_ssize_t _write(self, char *p, _Values *v, const char *prev) noexcept nogil:
        """The line of `v` at `p` (v.size - 1 + HASH_TAIL bytes, id and rows included), its
        prev from `prev` (64 hex digits); -1 if its time cannot be written."""
        cdef Py_ssize_t n = 0, i
        cdef long long second = v.micros // 1000000
        cdef SHA256_CTX ctx
        cdef unsigned char md[32]
        if second != self._second and not self._set_second(second):
            return -1
        for i in range(6):
            memcpy(p + n, v.parts[i], v.sizes[i])
            n += v.sizes[i]
            if i == 0:
                memcpy(p + n, v.dur_text, v.dur_len)
                n += v.dur_len
            elif i == 1:
                n += _digits(p + n, <unsigned long long>v.id)
            elif i == 2:
                memcpy(p + n, prev, 64)
                n += 64
            elif i == 3:
                n += _digits(p + n, <unsigned long long>v.rows)
            elif i == 4:
                memcpy(p + n, self._prefix, PREFIX_LEN)
                _fixed(p + n + PREFIX_LEN, v.micros % 1000000, 6)
                p[n + PREFIX_LEN + 6] = b'Z'
                n += TS_LEN
        # The body (what is hashed) is n bytes; the line puts the hash in the place of its
        # closing brace: ,"hash":"…"}\n
        SHA256_Init(&ctx)
        SHA256_Update(&ctx, p, <size_t>n)
        SHA256_Final(md, &ctx)
        n -= 1
        memcpy(p + n, b',"hash":"', 9)
        n += 9
        for i in range(32):
            p[n + 2 * i] = _HEX[md[i] >> 4]
            p[n + 2 * i + 1] = _HEX[md[i] & 15]
        memcpy(p + n + 64, b'"}\n', 3)
        return n + 67

    def line(self, tuple parts, double duration, object rid, str prev, object rows, double ts):
        """The line of a statement event from its template's six parts (UTF-8) and its
        values, in the template's order: duration, id, prev, rows, ts. Sets `digest`. None
        when a value is outside what this writes (audit.py's own code makes that line)."""
        cdef _Values v
        cdef Py_ssize_t prev_len, n
        cdef const char *prev_p
        cdef object out
        if not _values(&v, parts, duration, rows, ts) or not _count(rid, &v.id):
            return None
        prev_p = PyUnicode_AsUTF8AndSize(prev, &prev_len)
        if prev_len != 64:
            return None
        n = v.size - 1 + HASH_TAIL + _digits_len(v.id) + _digits_len(v.rows)
        out = PyBytes_FromStringAndSize(NULL, n)
        if self._write(PyBytes_AS_STRING(out), &v, prev_p) != n:
            return None
        self.digest = PyUnicode_DecodeASCII(PyBytes_AS_STRING(out) + n - 67, 64, NULL)
        return out

    def block(self, object events, Py_ssize_t start, object rid, str prev):
        """The lines of the deferred events (`events`, a UsualEvents of _usual.pyx) from
        number `start` on, chained from id `rid` and `prev`, up to the first one line() would
        refuse: (their lines as one bytes, how many). Sets `digest` when there are any. The
        lines are written and hashed without the GIL: the audit writer thread calls this
        while the event loop goes on. (b"", 0) for the Python UsualEvents of _usual.py."""
        cdef long long first = 0
        cdef Py_ssize_t count = 0, total = 0, n, i, j, prev_len
        cdef _Values *vs
        cdef Usual *e
        cdef const char *prev_p
        cdef char *p
        cdef object out
        cdef UsualEvents queue
        if type(events) is not UsualEvents or not _count(rid, &first) or start < 0:
            return b"", 0
        queue = <UsualEvents>events
        prev_p = PyUnicode_AsUTF8AndSize(prev, &prev_len)
        if prev_len != 64 or start >= queue.n:
            return b"", 0
        n = queue.n - start
        vs = <_Values *>PyMem_Malloc(n * sizeof(_Values))
        if vs == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                e = &queue.items[start + i]
                vs[i].rows = e.rows
                if (e.rows < 0 or not _values_of(&vs[i], <object>e.parts, e.duration, e.ts)
                        or i > MAX_ID - first):
                    break
                vs[i].id = first + i
                vs[i].size += HASH_TAIL - 1 + _digits_len(vs[i].id) + _digits_len(vs[i].rows)
                total += vs[i].size
                count += 1
            if count == 0:
                return b"", 0
            out = PyBytes_FromStringAndSize(NULL, total)
            p = PyBytes_AS_STRING(out)
            j = 0
            with nogil:
                for i in range(count):
                    n = self._write(p, &vs[i], prev_p)
                    if n != vs[i].size:
                        break
                    prev_p = p + n - 67  # this line's hash is the next one's prev
                    p += n
                    j += 1
            if j == 0:
                return b"", 0
            self.digest = PyUnicode_DecodeASCII(p - 67, 64, NULL)  # (before `out` may go)
            if j < count:  # a time gmtime() cannot write: the lines before it
                out = out[:p - PyBytes_AS_STRING(out)]
            return out, j
        finally:
            PyMem_Free(vs)


cdef extern from "<sys/file.h>" nogil:
    int flock(int fd, int operation)
    enum:
        LOCK_EX
        LOCK_UN


cdef extern from "<sys/stat.h>" nogil:
    ctypedef long long off_t
    ctypedef unsigned long long dev_t
    ctypedef unsigned long long ino_t
    struct stat:
        dev_t st_dev
        ino_t st_ino
        off_t st_size
    int fstat(int fd, stat *buf)
    int c_stat "stat" (const char *path, stat *buf)


cdef extern from "<unistd.h>" nogil:
    ssize_t write(int fd, const void *buf, size_t n)
    int fsync(int fd)


cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EINTR


cdef inline void _lock(int fd, int op) noexcept nogil:
    # Best effort, as audit._flock: a file system without flock only loses the guard.
    while flock(fd, op) != 0 and errno == EINTR:
        pass


def append(int fd, bytes path, bytes data, long long size, bint sync):
    """Append `data` to the audit trail open at `fd` in one stretch without the GIL: under the
    file's flock, and only if the file is still the one at `path` and still `size` bytes long
    (nobody rotated it or appended since our last write); then fsync when `sync`. The new
    size, or -1 when the file is not as expected (nothing written: the caller takes its own,
    slower way, which re-reads the chain). Raises OSError when a call fails (a write may then
    have been partial: the caller re-opens the file, which drops a partial last line).

    One GIL hand-back per batch instead of one per system call: the audit writer thread that
    waits for the GIL after each call makes the event loop hand it over, every time."""
    cdef const char *p = data
    cdef const char *c_path = path
    cdef Py_ssize_t total = len(data)
    cdef Py_ssize_t left = total
    cdef ssize_t n
    cdef long long result = -1
    cdef int err = 0
    cdef stat mine, current
    with nogil:
        _lock(fd, LOCK_EX)
        if fstat(fd, &mine) != 0:
            err = errno
        elif (c_stat(c_path, &current) == 0 and current.st_ino == mine.st_ino
              and current.st_dev == mine.st_dev and mine.st_size == size):
            while left > 0:
                n = write(fd, p, <size_t>left)
                if n < 0:
                    if errno == EINTR:
                        continue
                    err = errno
                    break
                p += n
                left -= n
            if err == 0 and sync and fsync(fd) != 0:
                err = errno
            if err == 0:
                result = size + total
        _lock(fd, LOCK_UN)
    if err:
        raise OSError(err, os.strerror(err))
    return result
