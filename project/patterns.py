"""Subscription patterns and the segment trie that matches event names against all of them.

``*`` matches exactly one segment, ``#`` zero or more. Matching walks the trie along the
event name's (at most four) segments, so its cost depends on the name and on how many
wildcard branches exist at each depth, never on how many subscriptions share them.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Generic, TypeVar

from project.errors import InvalidPattern

__all__ = ["PatternTrie", "validate_pattern"]

MIN_SEGMENTS, MAX_SEGMENTS = 2, 4
_SEGMENT_RE = re.compile(r"^[a-z][a-z0-9_]*$")

V = TypeVar("V", bound=Hashable)


def validate_pattern(pattern: object) -> tuple[str, ...]:
    """Return the segments of ``pattern``, or raise :class:`InvalidPattern`.

    Raised for a malformed segment and for a pattern that can never match an event name
    (names have 2 to 4 segments, so ``a.b.c.d.e`` or a lone ``*`` matches nothing).
    """
    if not isinstance(pattern, str):
        raise InvalidPattern(f"pattern must be a str, got {type(pattern).__name__}")
    segments = tuple(pattern.split("."))
    for seg in segments:
        if seg not in ("*", "#") and not _SEGMENT_RE.match(seg):
            raise InvalidPattern(
                f"invalid pattern {pattern!r}: segment {seg!r} is neither lower-case snake_case, "
                "'*' (one segment) nor '#' (zero or more segments)"
            )
    fixed = sum(1 for seg in segments if seg != "#")
    unbounded = "#" in segments
    if fixed > MAX_SEGMENTS or (not unbounded and fixed < MIN_SEGMENTS):
        raise InvalidPattern(
            f"pattern {pattern!r} can never match: it needs "
            f"{fixed}{'+' if unbounded else ''} segments, event names have "
            f"{MIN_SEGMENTS} to {MAX_SEGMENTS}"
        )
    return segments


class _Node(Generic[V]):
    __slots__ = ("children", "hash", "star", "values")

    def __init__(self) -> None:
        self.children: dict[str, _Node[V]] = {}
        self.star: _Node[V] | None = None
        self.hash: _Node[V] | None = None
        self.values: set[V] = set()


class PatternTrie(Generic[V]):
    """Maps patterns to values; :meth:`match` returns every value whose pattern matches."""

    def __init__(self) -> None:
        self._root: _Node[V] = _Node()

    def insert(self, pattern: str, value: V) -> None:
        """Add ``value`` under ``pattern`` (validated with :func:`validate_pattern`)."""
        node = self._root
        for seg in validate_pattern(pattern):
            if seg == "*":
                node.star = node.star or _Node()
                node = node.star
            elif seg == "#":
                node.hash = node.hash or _Node()
                node = node.hash
            else:
                node = node.children.setdefault(seg, _Node())
        node.values.add(value)

    def match(self, event_type: str) -> set[V]:
        """Return the values of every pattern that matches the (valid) ``event_type``."""
        found: set[V] = set()
        self._walk(self._root, event_type.split("."), 0, found)
        return found

    def _walk(self, node: _Node[V], segs: list[str], i: int, found: set[V]) -> None:
        if node.hash is not None:
            # '#' swallows segs[i:j] for every j, including none.
            for j in range(i, len(segs) + 1):
                self._walk(node.hash, segs, j, found)
        if i == len(segs):
            found.update(node.values)
            return
        child = node.children.get(segs[i])
        if child is not None:
            self._walk(child, segs, i + 1, found)
        if node.star is not None:
            self._walk(node.star, segs, i + 1, found)
