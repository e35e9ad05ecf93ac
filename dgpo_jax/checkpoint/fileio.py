"""Writing result files so that a reader (or a killed run) never leaves half a file behind."""

from __future__ import annotations

import os
from collections.abc import Callable


def write_atomically(path: str, write: Callable[[str], object]) -> None:
    """Calls ``write(partial_path)``, then renames the partial file to ``path``.

    On an exception (KeyboardInterrupt included) the partial file is removed; ``path`` keeps its
    previous content or stays absent, also when the process is killed outright.
    """
    partial = f"{path}.partial-{os.getpid()}"
    try:
        write(partial)
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise


def write_text_atomically(path: str, text: str) -> None:
    """``text`` to ``path`` (UTF-8) through `write_atomically`."""

    def write(partial: str) -> None:
        with open(partial, "w", encoding="utf-8") as handle:
            handle.write(text)

    write_atomically(path, write)
