"""The blocking Python client: every method of the async `PromptQClient`, synchronously.

    with SyncPromptQClient("http://127.0.0.1:8000", api_key="pq_...") as pq:
        job = pq.submit_prompt("Say hello")
        done = pq.wait(job["id"], progress=lambda j: print(j["status"]))
        for event in pq.stream(job["id"]):
            print(event.event, event.data)

It runs one event loop in a background thread and forwards every attribute of the async client
to it: coroutine methods become blocking calls, async generators become iterators. Methods
added to PromptQClient later appear here without any change. Callbacks (such as `wait`'s
`progress`) run on that background thread, so they may not call the client (RuntimeError).
A client nobody closed is closed when it is garbage-collected, or at interpreter exit: its HTTP
session and thread do not outlive it.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
import weakref
from collections.abc import Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, TypeVar

from promptq.client import PromptQClient

T = TypeVar("T")


class _LoopThread:
    """An event loop running forever on a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="promptq-client-loop", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the loop and wait for its result (exceptions propagate).

        RuntimeError from the loop's own thread (a `wait` progress callback calling the
        client): waiting there for the loop would block it for good. Also once closed.
        """
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(
                "the sync client cannot be called from its own callbacks (they run on its "
                "event loop); collect what you need and call it after, or use the async client"
            )
        if self.loop.is_closed():
            coro.close()
            raise RuntimeError("this client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        """Stop the loop and its thread (from the loop's own thread: stop it only)."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is self._thread:
            return
        self._thread.join()
        self.loop.close()

    def shut_down(self, client: PromptQClient) -> None:
        """Close `client`'s HTTP session on the loop, then stop the loop."""
        try:
            if threading.current_thread() is not self._thread and not self.loop.is_closed():
                self.run(client.close())
        finally:
            self.stop()


class SyncPromptQClient:
    """PromptQClient with blocking methods. Arguments are PromptQClient's."""

    def __init__(self, base_url: str, **kwargs: Any) -> None:
        self._loop = _LoopThread()

        async def make() -> PromptQClient:
            return PromptQClient(base_url, **kwargs)

        self._client = self._loop.run(make())
        self._closed = False
        # Closes the session and stops the thread when close() is called, or else when this
        # client is collected (or the interpreter exits); it holds no reference to the client.
        self._finalizer = weakref.finalize(self, self._loop.shut_down, self._client)

    @property
    def async_client(self) -> PromptQClient:
        """The wrapped async client (use it only on this client's loop)."""
        return self._client

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # never the async client's internals (nor during __init__)
            raise AttributeError(name)
        attribute = getattr(self._client, name)
        if inspect.iscoroutinefunction(attribute):
            return self._blocking(attribute)
        if inspect.isasyncgenfunction(attribute):
            return self._iterating(attribute)
        return attribute

    def __dir__(self) -> list[str]:
        public = [n for n in dir(self._client) if not n.startswith("_")]
        return sorted(set(super().__dir__()) | set(public))

    def _blocking(self, method: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
        @functools.wraps(method)
        def call(*args: Any, **kwargs: Any) -> T:
            return self._loop.run(method(*args, **kwargs))

        return call

    def _iterating(self, method: Callable[..., Any]) -> Callable[..., Iterator[Any]]:
        @functools.wraps(method)
        def iterate(*args: Any, **kwargs: Any) -> Iterator[Any]:
            agen = method(*args, **kwargs)
            try:
                while True:
                    try:
                        yield self._loop.run(agen.__anext__())
                    except StopAsyncIteration:
                        return
            finally:
                if not self._closed:
                    self._loop.run(agen.aclose())

        return iterate

    def close(self) -> None:
        """Close the HTTP session and stop the background loop (idempotent)."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> SyncPromptQClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


#: The short name: `promptq.Client`.
Client = SyncPromptQClient
