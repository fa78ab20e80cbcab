"""The one exception type of the moeconv format readers.

Every problem a reader finds in a converted model (a damaged file, a header
that lies, an unsupported version) is a :class:`FormatError`, so callers catch
exactly one type, and the command line can print it as one line.
"""

from __future__ import annotations

import os

__all__ = ["FormatError"]

#: Longest tensor name or problem text a message quotes whole: a hostile file can hold megabyte-long values.
MAX_QUOTED = 400


def _elide(text: str) -> str:
    """``text``, or its two ends around a count of the characters left out, so the message stays readable."""
    if len(text) <= MAX_QUOTED:
        return text
    half = MAX_QUOTED // 2
    return f"{text[:half]}...[{len(text) - 2 * half} characters]...{text[-half:]}"


class FormatError(ValueError):
    """A converted model (or one file of it) is not valid moeconv format v1.

    The message names the file, the tensor when one is concerned, and what is
    wrong: ``"<file>: tensor '<name>': <problem>"`` or ``"<file>: <problem>"``
    (an overlong name or problem is shortened in the middle).  The parts are
    also kept whole as attributes for programs.
    """

    def __init__(self, file: str | os.PathLike, problem: str, tensor: str | None = None):
        self.file = os.fspath(file)
        self.tensor = tensor
        self.problem = problem
        where = f"{self.file}: tensor {_elide(repr(tensor))}" if tensor is not None else self.file
        super().__init__(f"{where}: {_elide(problem)}")
