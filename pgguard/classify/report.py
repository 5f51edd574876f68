"""The human format of `pgguard explain` (DESIGN §8); `Classification.to_json()` is the other."""

from __future__ import annotations

from pgguard.classify.classes import class_names
from pgguard.classify.classifier import Classification


def render_text(c: Classification) -> str:
    lines = [f"classes:     {', '.join(class_names(c.classes)) or '(nothing to run)'}"]
    if c.reason:
        lines.append(f"reason:      {c.reason}")
    for i, s in enumerate(c.statements, 1):
        one_line = " ".join(s.sql.split())
        if len(one_line) > 100:
            one_line = one_line[:97] + "..."
        lines.append(f"statement {i}: {', '.join(class_names(s.classes))}  {one_line}")
        if s.reason:
            lines.append(f"             reason: {s.reason}")
    lines.append(f"tables:      {', '.join(c.tables) or '-'}")
    if c.pii_matches:
        lines.append("pii columns:")
        for m in c.pii_matches:
            lines.append(f"  {m.column}  (rule: {m.rule})")
    else:
        lines.append("pii columns: -")
    lines.append(f"functions:   {', '.join(c.functions) or '-'}")
    lines.append(f"fingerprint: {c.fingerprint}")
    lines.append(f"redacted:    {c.redacted_sql}")
    return "\n".join(lines)
