"""Build hook: the relay's hot modules compiled with Cython, when possible (pyproject.toml has
everything else).

The modules stay plain Python (the reference, what mypy and the tests read); Cython compiles
them with C types from the .pxd next to each (annotations are not read as C types): the
framer's scan loop, the session, the audit sink and the per-statement metrics as extension
types. Some helpers exist only in C: `_auditline.pyx` writes the usual statement event's line
with OpenSSL's SHA-256 (it needs OpenSSL's headers, libssl-dev); audit.py has the same code in
Python and uses it without the helper. `proxy/_clock.pyx` is the monotonic clock as a C
function, which the compiled session calls (`_clock.py` is the same clock for pure Python), and
`proxy/_io.pyx` the session's send() of a reply straight to a socket (`_io.py` likewise), and
`observability/_usual.pyx` the audit's deferred statement events as C structs (`_usual.py`
likewise); they need nothing but libc, so they build whenever the session and the audit sink
do. Each extension is optional: without a C compiler (or
with PGGUARD_PURE_PYTHON=1) pgguard installs and runs as pure Python, only slower.
`pgguard run` logs which one it runs (`proxy.listening`, `compiled`).
"""

import os

from setuptools import setup
from setuptools.extension import Extension

# The per-message code of the relay, the per-statement audit event and metrics
# (benchmarks/README.md).
COMPILED = ["pgguard/protocol/framing.py", "pgguard/proxy/session.py",
            "pgguard/observability/audit.py", "pgguard/observability/tally.py"]


def extensions() -> list[Extension]:
    if os.environ.get("PGGUARD_PURE_PYTHON"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        return []
    modules = [Extension(path[:-3].replace("/", "."), [path], optional=True)
               for path in COMPILED]
    modules.append(Extension("pgguard.proxy._clock", ["pgguard/proxy/_clock.pyx"],
                             optional=True))
    modules.append(Extension("pgguard.proxy._io", ["pgguard/proxy/_io.pyx"], optional=True))
    modules.append(Extension("pgguard.observability._usual", ["pgguard/observability/_usual.pyx"],
                             optional=True))
    modules.append(Extension("pgguard.observability._auditline",
                             ["pgguard/observability/_auditline.pyx"], libraries=["crypto"],
                             define_macros=[("OPENSSL_SUPPRESS_DEPRECATED", None)],
                             optional=True))
    return cythonize(modules, compiler_directives={"language_level": "3",
                                                     "annotation_typing": False}, quiet=True)


setup(ext_modules=extensions())
