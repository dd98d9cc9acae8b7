"""Requests to the source on their own, under trio's MockClock: a deadline per request,
the answer's length checked, each request counted, and blame passed to the source."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from fetcher.config import FetchStats
from fetcher.errors import DeadlineError, IntegrityError
from fetcher.origin import Origin
from fetcher.plan import plan_ranges

from .fakes import ScriptedSource, make_blob


class Short(ScriptedSource):
    async def read_range(self, digest, offset, length):
        return (await super().read_range(digest, offset, length))[:-1]


class Mirrored(ScriptedSource):
    def blame(self, digest, offset, length):
        self.blamed = (digest, offset, length)
        return True


def test_a_request_answers_within_its_deadline_or_fails_counted():
    blob, chunks, raw = make_blob([os.urandom(3000), os.urandom(2000)])
    [rng] = plan_ranges(chunks, max_request=1 << 20, max_gap=0)
    stats = FetchStats()
    answers = []

    async def main():
        origin = Origin(ScriptedSource({blob.digest: raw}, ["ok", "stall"]), "origin", stats,
                        lambda *a: answers.append(a[:2]))
        assert await origin.request(rng, 5) == raw
        start = trio.current_time()
        with pytest.raises(DeadlineError, match="within 5s"):
            await origin.request(rng, 5)
        assert trio.current_time() - start == 5
        with pytest.raises(IntegrityError, match=f"for a {len(raw)}-byte range"):
            await Origin(Short({blob.digest: raw}), "origin", stats).request(rng, 5)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert (stats.requests, stats.timeouts, stats.bytes_received) == (3, 1, len(raw))
    assert answers == [("origin", len(raw))]


def test_blame_is_the_sources_answer_for_the_range():
    blob, chunks, raw = make_blob([os.urandom(3000)])
    [rng] = plan_ranges(chunks, max_request=1 << 20, max_gap=0)
    assert Origin(ScriptedSource({blob.digest: raw}), "origin", FetchStats()).blame(rng) is False
    mirrored = Mirrored({blob.digest: raw})
    assert Origin(mirrored, "origin", FetchStats()).blame(rng) is True
    assert mirrored.blamed == (blob.digest, 0, len(raw))
