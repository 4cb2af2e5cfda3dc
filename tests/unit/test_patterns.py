"""The segment trie against a straightforward reference matcher."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from project.errors import InvalidPattern
from project.patterns import PatternTrie, validate_pattern

SEGMENTS = st.sampled_from(["a", "b", "c", "user", "x_1"])
NAMES = st.lists(SEGMENTS, min_size=2, max_size=4).map(".".join)
PATTERNS = st.lists(st.one_of(SEGMENTS, st.just("*"), st.just("#")), min_size=1, max_size=6).map(".".join)


def reference(pattern: list[str], name: list[str]) -> bool:
    if not pattern:
        return not name
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(reference(rest, name[i:]) for i in range(len(name) + 1))
    if not name:
        return False
    return (head in ("*", name[0])) and reference(rest, name[1:])


def _valid(pattern: str) -> bool:
    try:
        validate_pattern(pattern)
    except InvalidPattern:
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(st.lists(PATTERNS, min_size=1, max_size=12), st.lists(NAMES, min_size=1, max_size=10))
def test_trie_matches_exactly_what_the_reference_matches(patterns: list[str], names: list[str]) -> None:
    trie: PatternTrie[int] = PatternTrie()
    kept = {i: p for i, p in enumerate(patterns) if _valid(p)}
    for i, p in kept.items():
        trie.insert(p, i)
    for name in names:
        expected = {i for i, p in kept.items() if reference(p.split("."), name.split("."))}
        assert trie.match(name) == expected, (name, kept)


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("cosmic.*", "cosmic.full_moon", True),
        ("cosmic.*", "cosmic.solar_storm.detected", False),
        ("cosmic.#", "cosmic.solar_storm.detected", True),
        ("cosmic.#", "cosmic.full_moon", True),
        ("#.detected", "cosmic.solar_storm.detected", True),
        ("user.#.updated", "user.updated", True),
        ("*.*.detected", "cosmic.solar_storm.detected", True),
        ("#", "a.b", True),
    ],
)
def test_wildcards(pattern: str, name: str, matches: bool) -> None:
    trie: PatternTrie[str] = PatternTrie()
    trie.insert(pattern, "x")
    assert (trie.match(name) == {"x"}) is matches


@pytest.mark.parametrize(
    "pattern",
    [
        "a.b.c.d.e",
        "*",
        "a",
        "*.*.*.*.*",
        "a.b.c.d.e.#",
        "User.created",
        "user..created",
        "user.cre-ated",
        "user.#x",
        "",
    ],
)
def test_pattern_that_cannot_match_or_is_malformed_is_refused(pattern: str) -> None:
    with pytest.raises(InvalidPattern):
        validate_pattern(pattern)


def test_matching_many_subscriptions_walks_only_matching_branches() -> None:
    trie: PatternTrie[int] = PatternTrie()
    for i in range(10_000):
        trie.insert(f"scope{i}.entity.done", i)
    trie.insert("scope7.#", -1)
    assert trie.match("scope7.entity.done") == {7, -1}
    assert trie.match("other.entity.done") == set()
