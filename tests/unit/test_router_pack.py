"""The router cuts a batch into script calls of at most ROUTER_BATCH_MAX_BYTES."""

from __future__ import annotations

from project.router import _Item, _pack


def _item(n: int, size: int) -> _Item:
    return _Item(f"{n}-0", "d", "r" * size, "", None, [("alpha", "m" * size)])


def test_runs_stay_under_the_limit_and_keep_the_order() -> None:
    items = [_item(i, 10_000) for i in range(50)]
    runs = list(_pack(items, 64 * 1024))
    assert [i for run in runs for i in run] == items
    assert len(runs) > 1
    for run in runs:
        assert sum(i.size() for i in run) <= 64 * 1024


def test_an_item_over_the_limit_goes_alone() -> None:
    items = [_item(0, 100), _item(1, 200_000), _item(2, 100)]
    assert [[i.eid for i in run] for run in _pack(items, 64 * 1024)] == [["0-0"], ["1-0"], ["2-0"]]


def test_size_counts_bytes_not_characters() -> None:
    ascii_item = _Item("1-0", "d", "e" * 100, "", None)
    accented = _Item("1-0", "d", "é" * 100, "", None)
    assert accented.size() - ascii_item.size() == 100


def test_nothing_to_pack() -> None:
    assert list(_pack([], 1024)) == []
