"""One-line messages from errors that run to dozens of lines (orbax, tensorstore, torch)."""

from __future__ import annotations

from collections.abc import Sequence


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most `limit` characters."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def some(items: Sequence[str], shown: int = 5) -> str:
    """`a, b, c and 4 more`: a list that stays one readable line."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more
