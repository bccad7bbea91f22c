"""The consumer's bearer tokens as configured (CONSUMER_AUTH_TOKENS, a token file):
parsed and checked once, at settings time, so a bad entry is a settings error naming
its position and never showing a token. daemons.auth checks calls against them."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

MIN_TOKEN_CHARS = 16  # a guessable token is no authentication
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TOKEN = re.compile(r"^[A-Za-z0-9._~+/=-]+$")  # what fits in a header unquoted


def parse_tokens(entries: Iterable[str], where: str) -> dict[str, str]:
    """`name:token` or a bare `token` (named client1, client2, ...) -> {token: name}.
    Raises ValueError naming the bad entry by position, never showing a token."""
    tokens: dict[str, str] = {}
    for n, entry in enumerate(entries, 1):
        name, sep, token = entry.strip().rpartition(":")
        if not sep:
            name = f"client{n}"
        if not _NAME.match(name):
            raise ValueError(f"{where} entry {n}: a name is letters, digits, . _ - (64 at most)")
        if len(token) < MIN_TOKEN_CHARS or not _TOKEN.match(token):
            raise ValueError(
                f"{where} entry {n}: a token is at least {MIN_TOKEN_CHARS} of"
                " A-Z a-z 0-9 . _ ~ + / = - (e.g. `openssl rand -hex 24`)"
            )
        if token in tokens:
            raise ValueError(f"{where} entry {n}: the same token twice")
        tokens[token] = name
    return tokens


def tokens_from(inline: str | None, file: Path | None) -> dict[str, str]:
    """Every configured token: CONSUMER_AUTH_TOKENS (comma-separated) and the file
    (one entry a line, # comments)."""
    tokens: dict[str, str] = {}
    if inline:
        tokens.update(parse_tokens(inline.split(","), "CONSUMER_AUTH_TOKENS"))
    if file is not None:
        lines = [ln.split("#", 1)[0].strip() for ln in file.read_text().splitlines()]
        found = parse_tokens([ln for ln in lines if ln], f"CONSUMER_AUTH_TOKEN_FILE {file}")
        if set(found) & set(tokens):
            raise ValueError("a token is both in CONSUMER_AUTH_TOKENS and the token file")
        tokens.update(found)
    return tokens
