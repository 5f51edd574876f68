"""pgguard: a PostgreSQL wire-protocol proxy that classifies every statement and holds the
sensitive ones until the user steps up with a TOTP code."""

__version__ = "0.1.0"
