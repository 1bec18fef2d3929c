"""The CLI's progress bars (`promptq batch --wait`, `promptq summarize`): a description, the
bar, done/total, a state text (`{task.fields[state]}`) and the time elapsed."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def progress_bars(console: Console) -> Progress:
    """A Progress whose tasks each take a `state` field, drawn on `console`."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
        console=console,
    )
