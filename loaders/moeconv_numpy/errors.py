"""The one exception type of the moeconv format readers.

Every problem a reader finds in a converted model (a damaged file, a header
that lies, an unsupported version) is a :class:`FormatError`, so callers catch
exactly one type, and the command line can print it as one line.
"""

from __future__ import annotations

import os

__all__ = ["FormatError"]


class FormatError(ValueError):
    """A converted model (or one file of it) is not valid moeconv format v1.

    The message names the file, the tensor when one is concerned, and what is
    wrong: ``"<file>: tensor '<name>': <problem>"`` or ``"<file>: <problem>"``.
    The parts are also kept as attributes for programs.
    """

    def __init__(self, file: str | os.PathLike, problem: str, tensor: str | None = None):
        self.file = os.fspath(file)
        self.tensor = tensor
        self.problem = problem
        where = f"{self.file}: tensor {tensor!r}" if tensor is not None else self.file
        super().__init__(f"{where}: {problem}")
