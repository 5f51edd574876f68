"""PostgreSQL identifier normalisation, shared by the rules, the catalog and the resolver.

PostgreSQL folds unquoted identifiers to lower case (ASCII only: `ÉMAIL` stays `Émail`'s
upper-case É) and keeps quoted ones exactly, so `"Users"` is not `users` (CLASSIFICATION §6).
A relation is named by `QualName = (schema, name)`; an unqualified reference has no schema.
"""

from __future__ import annotations

import functools
from typing import Any

from sqlglot import exp

QualName = tuple[str, str]

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_IDENTIFIER = exp.Identifier


def fold(name: str) -> str:
    """Fold an unquoted identifier like PostgreSQL's `downcase_identifier` (ASCII only)."""
    # str.lower() is exact for ASCII text and much faster than a translate table.
    return name.lower() if name.isascii() else name.translate(_ASCII_LOWER)


def ident_name(node: Any) -> str:
    """The normalised text of a sqlglot Identifier (or a plain string / other node)."""
    if type(node) is _IDENTIFIER or isinstance(node, exp.Identifier):  # hot: exact type first
        text = node.this
        if type(text) is not str:
            text = str(text)
        if node.args.get("quoted"):
            return text
        return text.lower() if text.isascii() else text.translate(_ASCII_LOWER)
    if isinstance(node, str):
        return fold(node)
    if isinstance(node, exp.Expression):
        return fold(node.name)
    return ""


def split_config_name(text: str) -> list[str]:
    """`public."Users"` → ["public", "Users"]: the config's dotted names, quoted or not.

    Raises ValueError on an unterminated quote or an empty part.
    """
    parts: list[str] = []
    i, n = 0, len(text)
    while i <= n:
        if i < n and text[i] == '"':
            j, buf = i + 1, []
            while True:
                if j >= n:
                    raise ValueError(f"unterminated quoted identifier in {text!r}")
                if text[j] == '"':
                    if j + 1 < n and text[j + 1] == '"':
                        buf.append('"')
                        j += 2
                        continue
                    break
                buf.append(text[j])
                j += 1
            parts.append("".join(buf))
            i = j + 1
        else:
            j = text.find(".", i)
            j = n if j < 0 else j
            part = text[i:j].strip()
            if not part:
                raise ValueError(f"empty name part in {text!r}")
            parts.append(fold(part))
            i = j
        if i < n and text[i] != ".":
            raise ValueError(f"unexpected text after a quoted name in {text!r}")
        i += 1
    return parts


def qualname_from_config(text: str, default_schema: str = "public") -> QualName:
    """`users` → (public, users); `billing.cards` → (billing, cards)."""
    parts = split_config_name(text.strip())
    if len(parts) == 1:
        return (default_schema, parts[0])
    if len(parts) == 2:
        return (parts[0], parts[1])
    raise ValueError(f"expected schema.name, got {text!r}")


def render(name: tuple[str, ...]) -> str:
    """(public, users) → `public.users`; names needing quotes are quoted."""
    return ".".join(_quote(p) for p in name)


@functools.lru_cache(maxsize=4096)
def _quote(part: str) -> str:
    if part and (part[0].isalpha() or part[0] == "_") and all(
            c.isalnum() or c in "_$" for c in part) and fold(part) == part:
        return part
    return '"' + part.replace('"', '""') + '"'
