"""What the server says about its own faults: one line, and no server path in it.

A client may see a job's error message and every API error, and neither may show where the server keeps its data,
its uploads or its model: :class:`Scrubber` replaces the server's folders (and any other absolute path) by words.
:func:`describe` turns an exception into one such line; an ``OSError`` is told by its ``strerror`` alone, because
its ``str`` names the file.
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from cinematic.serve.store import StoreError

# a disk that is full, read-only or gone, SQLite saying so, and a shared database that cannot be reached
STORAGE_ERRORS = (OSError, sqlite3.Error, StoreError)
# Any absolute path left after the known folders are replaced: a slash after a space, a quote or the start, then
# at least two segments (so "8/16" or "a /b" in prose stays).
_ANY_PATH = re.compile(r"(?<![\w./-])/(?:[\w.@+-]+/)+[\w.@+-]*")
_REST = r"(?:/[\w.@+-]*)*"


class Scrubber:
    """Replaces each of the server's folders (given as ``(folder, words)``, e.g. the uploads folder by
    "the upload") and anything under it in a message, then any other absolute path by "a server path"."""

    def __init__(self, places: Iterable[tuple[Path | str | None, str]]):
        spelled: list[tuple[str, str]] = []
        for folder, words in places:
            if folder is None or str(folder) in ("", "."):
                continue
            for form in {str(folder), str(Path(folder).expanduser().resolve())}:
                spelled.append((form.rstrip("/"), words))
        spelled.sort(key=lambda pair: len(pair[0]), reverse=True)  # the uploads folder before the data folder
        # A relative folder ("data") is replaced only where a path follows it, so the word in prose stays.
        self._places = [
            (
                re.compile(
                    r"(?<![\w.@+-])" + re.escape(form) + ("(?![\\w.@+-])" if form.startswith("/") else "(?=/)") + _REST
                ),
                words,
            )
            for form, words in spelled
        ]

    def __call__(self, message: str) -> str:
        for pattern, words in self._places:
            message = pattern.sub(words, message)
        return _ANY_PATH.sub("a server path", message)


def describe(error: BaseException) -> str:
    """``error`` in one line without a file name: ``OSError`` by its errno's text, others by their message."""
    if isinstance(error, OSError) and error.errno is not None:
        return os.strerror(error.errno)
    text = " ".join(str(error).split())
    return text or type(error).__name__


def storage_fault(error: BaseException) -> bool:
    return isinstance(error, STORAGE_ERRORS)
