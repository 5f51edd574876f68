"""Tokenize once, split on semicolons, un-lump sqlglot's command strings (CLASSIFICATION §2).

sqlglot's tokenizer resolves quotes, dollar quotes, E'' escapes and nested comments exactly as
PostgreSQL does, so splitting on its SEMICOLON tokens gives PostgreSQL's statement boundaries.
After a "command" keyword (EXPLAIN, PREPARE, DO, CALL, EXECUTE, FETCH, SHOW, LOCK, VACUUM, …) it
lumps the rest of the statement into one STRING token; `flatten()` re-tokenizes such a tail and
keeps absolute offsets, so keyword handlers, fingerprints and redaction see real tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlglot import exp
from sqlglot.dialects.dialect import Dialect
from sqlglot.errors import ParseError, TokenError
from sqlglot.tokenizer_core import Token, TokenType

# sqlglot logs a warning for every Command fallback; we turn those into UNKNOWN ourselves.
logging.getLogger("sqlglot").setLevel(logging.ERROR)

DIALECT = Dialect.get_or_raise("postgres")
COMMAND_TOKENS: frozenset[TokenType] = frozenset(DIALECT.tokenizer_class.COMMANDS)

# Token types that carry literal values: replaced in fingerprints and redacted SQL.
LITERAL_TOKENS: frozenset[TokenType] = frozenset({
    TokenType.STRING, TokenType.NUMBER, TokenType.HEX_STRING, TokenType.BIT_STRING,
    TokenType.BYTE_STRING, TokenType.NATIONAL_STRING, TokenType.HEREDOC_STRING,
    TokenType.RAW_STRING, TokenType.UNICODE_STRING,
})

__all__ = ["COMMAND_TOKENS", "LITERAL_TOKENS", "Chunk", "ParseError", "Segment", "TokenError",
           "flat_tokens", "flatten", "parse_chunk", "parse_query", "segments", "split",
           "tokenize"]


@dataclass(frozen=True, slots=True)
class Chunk:
    """One statement's tokens. `text` is the string the tokens' offsets index into and `base`
    is where `text` starts in the whole message (non-zero for a re-tokenized tail)."""

    text: str
    tokens: tuple[Token, ...]
    base: int = 0

    @property
    def start(self) -> int:
        return self.base + self.tokens[0].start

    @property
    def end(self) -> int:
        """Exclusive end in the message."""
        return self.base + self.tokens[-1].end + 1

    def source(self) -> str:
        return self.text[self.tokens[0].start:self.tokens[-1].end + 1]

    def sub(self, begin: int) -> Chunk:
        """The chunk from token `begin` on (an inner statement)."""
        return Chunk(self.text, self.tokens[begin:], self.base)


def tokenize(sql: str) -> list[Token]:
    """Raises TokenError (unterminated string or comment, …)."""
    return DIALECT.tokenize(sql)


def split(sql: str, tokens: list[Token]) -> list[Chunk]:
    chunks: list[Chunk] = []
    current: list[Token] = []
    semicolon = TokenType.SEMICOLON  # (enum attribute lookups are slow in the loop)
    for tok in tokens:
        if tok.token_type is semicolon:
            if current:
                chunks.append(Chunk(sql, tuple(current)))
            current = []
        else:
            current.append(tok)
    if current:
        chunks.append(Chunk(sql, tuple(current)))
    return chunks


def lumped_tail(chunk: Chunk) -> Chunk | None:
    """If the chunk is `COMMAND STRING` (sqlglot lumped the statement's rest into the STRING),
    the tail re-tokenized (offsets relative to the tail, `base` absolute); else None."""
    toks = chunk.tokens
    if len(toks) != 2 or toks[0].token_type not in COMMAND_TOKENS or \
            toks[1].token_type is not TokenType.STRING:
        return None
    tail = toks[1].text
    tail_start = toks[1].end - len(tail) + 1  # the lumped token's start offset is not reliable
    if chunk.text[tail_start:toks[1].end + 1] != tail:
        raise TokenError("cannot locate a command's text")
    inner = tokenize(tail)
    if not inner:
        return Chunk(tail, (), chunk.base + tail_start)
    return Chunk(tail, tuple(inner), chunk.base + tail_start)


# A token of the fully un-lumped statement: (type, text, start, end), absolute offsets in the
# message, end exclusive.
FlatToken = tuple[TokenType, str, int, int]

# A run of un-lumped tokens and the message offset their `start`/`end` are relative to.
# `segments()` is what the per-message pass (fingerprint, redaction) reads: it keeps sqlglot's
# own Token objects instead of building a tuple for every token of every cold message.
Segment = tuple[int, tuple[Token, ...]]


def segments(chunk: Chunk) -> list[Segment]:
    """All tokens of the statement, lumped tails re-tokenized recursively, as segments."""
    tail = lumped_tail(chunk)
    if tail is None:
        return [(chunk.base, chunk.tokens)]
    out: list[Segment] = [(chunk.base, chunk.tokens[:1])]
    if tail.tokens:
        out.extend(segments(tail))
    return out


def flatten(chunk: Chunk) -> list[FlatToken]:
    """All tokens of the statement, lumped tails re-tokenized recursively."""
    return flat_tokens(segments(chunk))


def flat_tokens(segs: list[Segment]) -> list[FlatToken]:
    return [(t.token_type, t.text, base + t.start, base + t.end + 1)
            for base, toks in segs for t in toks]


def parse_chunk(chunk: Chunk) -> exp.Expression:
    """Parse exactly one statement from the chunk's tokens. Raises ParseError."""
    trees = [t for t in DIALECT.parser().parse(list(chunk.tokens), chunk.text)
             if isinstance(t, exp.Expression)]
    if len(trees) != 1:
        raise ParseError(f"expected one statement, got {len(trees)}")
    return trees[0]


def parse_query(sql: str) -> exp.Expression | None:
    """A view definition → its tree, or None if it is not one parseable query."""
    try:
        chunks = split(sql, tokenize(sql))
        if len(chunks) != 1:
            return None
        tree = parse_chunk(chunks[0])
    except (ParseError, TokenError, RecursionError):
        return None
    if not isinstance(tree, exp.Select | exp.SetOperation | exp.Values | exp.Subquery):
        return None
    if any(isinstance(n, exp.Command) for n in tree.walk()):
        return None
    return tree
