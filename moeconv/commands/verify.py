"""``moeconv verify PATH``: check a converted model's structure and every checksum.

It needs only the NumPy reader, so it starts fast and works where torch is not
installed.  Damage is reported as ONE line (``error: <file>: tensor '<name>':
<problem>``) and exit status 1, never a traceback, so scripts can rely on it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import click

from moeconv_numpy import FormatError, open_model


def _one_line(text: str) -> str:
    return " ".join(str(text).split("\n"))


@contextlib.contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn any failure into one line on stderr and exit status 1 (2 for a bug of ours)."""
    try:
        yield
    except FormatError as exc:
        click.echo(f"error: {_one_line(exc)}", err=True)
        sys.exit(1)
    except (OSError, KeyError) as exc:
        click.echo(f"error: {_one_line(exc)}", err=True)
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - the promise is "never a traceback"
        click.echo(f"error: internal error ({type(exc).__name__}: {_one_line(exc)}); please report it", err=True)
        sys.exit(2)


@click.command("verify")
@click.argument("path", type=click.Path(file_okay=True, dir_okay=True, path_type=str))
def command(path: str) -> None:
    """Check PATH (a converted model directory): structure and every checksum.

    Exit status 0 when the model is sound; otherwise one line naming the file,
    the tensor and the damage, and exit status 1.
    """
    with one_line_errors():
        report = open_model(path).verify()
    click.echo(
        f"ok: {path}: {report.tensors} tensors ({report.weights} quantized weights) in {report.shards} "
        f"shard(s), {report.tensor_bytes} bytes, every checksum matches"
    )
