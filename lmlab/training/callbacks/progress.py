"""The progress bar of a run: rich's in a terminal, the plain one in a file or a pipe.
"""

from __future__ import annotations

import os

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar


def progress_bar(enabled: bool = True) -> TQDMProgressBar | RichProgressBar | None:
    """Rich's progress bar in a terminal; the plain one when the output goes to a file or
    a pipe, where rich's live display shows nothing until the end; none when the trainer's
    `enable_progress_bar` is false. Ranks other than 0 disable theirs (Lightning)."""
    if not enabled:
        return None
    return RichProgressBar() if os.isatty(1) else TQDMProgressBar()
