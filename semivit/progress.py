"""Rich progress bars for long work (training epochs, decoding, prediction)."""

from __future__ import annotations

import os

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from semivit.utils import console


def progress_bar(transient: bool = False) -> Progress:
    """A progress display on stderr; ``SEMIVIT_QUIET=1`` turns it off (CI logs stay short)."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=transient,
        disable=bool(os.environ.get("SEMIVIT_QUIET")),
    )
