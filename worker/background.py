"""A worker component with a loop of its own: `start()` runs it, `stop()` ends it."""

from __future__ import annotations

import asyncio


class Background:
    """Runs `_run()` as one task, named TASK_NAME, from start() until stop()."""

    TASK_NAME = "promptq-background"
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Run the loop in the background until stop()."""
        self._task = asyncio.create_task(self._run(), name=self.TASK_NAME)

    async def stop(self) -> None:
        """Cancel the loop and wait until it has ended."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        raise NotImplementedError
