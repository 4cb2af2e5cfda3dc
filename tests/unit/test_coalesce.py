"""What a coalesced round trip does with replies it cannot match to its calls."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

from project.coalesce import Coalescer


@pytest.mark.parametrize("replies", [["1-0"], ["1-0", "2-0", "3-0"]])
def test_a_reply_count_that_does_not_match_the_batch_fails_every_call_and_leaves_none_waiting(
    replies: list[str],
) -> None:
    async def main() -> list[BaseException | Any]:
        loop = asyncio.get_running_loop()
        batch: Any = [(("dedup", "{}", "channel"), loop.create_future()) for _ in range(2)]

        async def answered() -> list[str]:
            return replies

        await Coalescer._settle(batch, answered())
        return [f.exception() if f.exception() else f.result() for _, f in batch]  # all done: no wait

    outcomes = asyncio.run(main())
    assert all(isinstance(o, redis.exceptions.InvalidResponse) for o in outcomes), outcomes
