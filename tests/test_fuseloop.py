"""The request loop lazyfs gives pyfuse3: a descriptor already readable is returned at once,
without parking the task; one that is not, or that reports an error condition, is waited
for as trio waits; and pyfuse3 sees trio otherwise unchanged."""

from __future__ import annotations

import os

import pyfuse3
import pytest
import trio

from lazyfs import fuseloop


@pytest.fixture
def pipe():
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def test_a_readable_descriptor_is_returned_without_trio_s_wait(pipe, monkeypatch):
    r, w = pipe
    os.write(w, b"x")
    called = []

    async def trio_wait(fd):
        called.append(fd)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", trio_wait)

    async def main():
        for _ in range(3):
            await fuseloop.wait_readable(r)

    trio.run(main)
    assert called == []


def test_a_descriptor_not_yet_readable_is_waited_for(pipe):
    r, w = pipe

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_write_later, w)
            with trio.fail_after(5):
                await fuseloop.wait_readable(r)
            return os.read(r, 1)

    assert trio.run(main) == b"y"


async def _write_later(w: int) -> None:
    await trio.sleep(0.05)
    os.write(w, b"y")


def test_an_error_condition_goes_to_trio_s_wait(pipe, monkeypatch):
    r, w = pipe
    os.close(w)  # POLLHUP, not POLLIN alone
    called = []
    real = trio.lowlevel.wait_readable

    async def trio_wait(fd):
        called.append(fd)
        await real(fd)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", trio_wait)
    trio.run(fuseloop.wait_readable, r)
    assert called == [r]


def test_install_changes_only_wait_readable_and_uninstall_restores_trio():
    try:
        fuseloop.install()
        fuseloop.install()  # twice is once
        fake = pyfuse3.trio
        assert fake is not trio and fake.lowlevel.wait_readable is fuseloop.wait_readable
        assert fake.Lock is trio.Lock and fake.ClosedResourceError is trio.ClosedResourceError
        assert fake.lowlevel.current_task is trio.lowlevel.current_task
        assert fake.open_nursery is trio.open_nursery
        assert trio.lowlevel.wait_readable is not fuseloop.wait_readable  # trio itself untouched
    finally:
        fuseloop.uninstall()
    assert pyfuse3.trio is trio
