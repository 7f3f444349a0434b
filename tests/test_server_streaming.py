"""``unless_disconnected``: the proxy's watch for clients that leave, on both backends."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from aicortex.server._streaming import unless_disconnected


def receiving(disconnect_after: float | None) -> Any:
    """An ASGI ``receive`` whose body was read; it reports a disconnect after a delay."""

    async def receive() -> dict[str, Any]:
        if disconnect_after is None:
            await anyio.sleep_forever()
        await anyio.sleep(disconnect_after)
        return {"type": "http.disconnect"}

    return receive


async def test_work_that_finishes_returns_its_result() -> None:
    """A client that stays gets the result."""

    async def work() -> str:
        await anyio.sleep(0.01)
        return "answer"

    with anyio.fail_after(2):
        assert await unless_disconnected(receiving(None), work) == ("answer",)


async def test_a_client_that_leaves_cancels_the_work() -> None:
    """The work is cancelled as soon as the disconnect arrives; None says so."""
    cancelled = anyio.Event()

    async def work() -> str:
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()
        return "never"

    with anyio.fail_after(2):
        assert await unless_disconnected(receiving(0.05), work) is None
    assert cancelled.is_set()


async def test_an_error_in_the_work_is_raised_as_it_is() -> None:
    """The work's own exception comes out unwrapped, not in an exception group."""

    async def work() -> str:
        raise LookupError("no such model")

    with anyio.fail_after(2), pytest.raises(LookupError, match="no such model"):
        await unless_disconnected(receiving(None), work)


async def test_an_outer_cancellation_is_not_mistaken_for_a_disconnect() -> None:
    """Cancelling the caller cancels the work and propagates; it does not return None."""
    reached = []

    async def work() -> str:
        await anyio.sleep_forever()
        return "never"

    with anyio.move_on_after(0.05) as scope:
        await unless_disconnected(receiving(None), work)
        reached.append(True)
    assert scope.cancelled_caught
    assert not reached


async def test_quick_work_never_waits_on_the_client() -> None:
    """Work that ends before the watch starts does not read from the client at all."""
    calls: list[bool] = []

    async def receive() -> dict[str, Any]:
        calls.append(True)
        await anyio.sleep_forever()
        return {"type": "http.disconnect"}

    async def work() -> str:
        return "quick"

    assert await unless_disconnected(receive, work) == ("quick",)
    await anyio.sleep(0.1)  # past the watch delay: nothing was left scheduled
    assert calls == []


async def test_a_client_that_leaves_cancels_work_inside_its_own_scopes() -> None:
    """The cancellation reaches work waiting inside its own cancel scope and
    timeouts, and the work's cleanup runs."""
    cleaned = anyio.Event()

    async def work() -> str:
        try:
            with anyio.CancelScope(), anyio.move_on_after(30):
                await anyio.sleep_forever()
        finally:
            cleaned.set()
        return "never"

    with anyio.fail_after(2):
        assert await unless_disconnected(receiving(0.01), work) is None
    assert cleaned.is_set()
    await anyio.sleep(0.01)  # and the caller is not cancelled afterwards
