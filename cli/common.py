"""What every command shares: consoles, one-line errors, --json output, tables, renamed options."""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import IO, Any

import typer
from rich.console import Console, ConsoleDimensions
from rich.table import Table

from dmrx.artifacts.atomic import jsonable
from dmrx.errors import DmrxError

PIPE_WIDTH = 1000
# what a command needs beyond the torch-free inference install, and the extra that brings it
EXTRAS = {"torch": "train", "matplotlib": "plot", "faiss": "faiss", "tensorrt": "trt"}


class _Console(Console):
    """Fits a terminal's width; a pipe or a log has none to fit, so there tables are never wrapped at 80
    columns or cut (an explicit COLUMNS still wins)."""

    def _size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        if self.is_terminal or self._width is not None or "COLUMNS" in self._environ:
            return size
        return ConsoleDimensions(PIPE_WIDTH, size.height)

    size = property(_size, Console.size.fset)


console = _Console()
err_console = _Console(stderr=True)


def _one_line(message: str) -> None:
    err_console.print("[bold red]error:[/] ", end="")
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)
    from dmrx.artifacts.hdf5 import hdf5_broken

    if hdf5_broken():  # outputs are cleaned up already; HDF5's exit handler would crash on its broken state
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)


def user_errors(fn):
    """Turn a DmrxError into one line on stderr and exit code 2: no traceback, the message says it all."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DmrxError as e:
            _one_line(str(e))
            raise typer.Exit(2) from None
        except OSError as e:
            # the net under every writer's own handling: a full disk or a read-only place is the
            # environment's problem, said in one line, whichever file it struck
            from dmrx.artifacts.atomic import WRITE_ERRNOS, write_error

            if e.errno not in WRITE_ERRNOS or e.filename is None:
                raise
            _one_line(str(write_error(e.filename, e)))
            raise typer.Exit(2) from None
        except ImportError as e:
            if e.name not in EXTRAS:
                raise
            _one_line(f"this command needs {e.name}, which is not installed: pip install 'dmrx[{EXTRAS[e.name]}]'")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def print_json(obj: Any, file: IO[str] | None = None, indent: int | None = 2) -> None:
    """Write obj as strict JSON (undefined numbers are null) to stdout or `file`; indent=None writes one
    line (a JSON Lines record)."""
    text = json.dumps(jsonable(obj), indent=indent, default=str, allow_nan=False)
    (file or sys.stdout).write(text + "\n")


def print_table(table: Table, to: Console | None = None) -> None:
    """Print a table whose cells fold onto a second line rather than end in "…" when a terminal is too
    narrow: a cut number reads as a different number."""
    for column in table.columns:
        column.overflow = "fold"
    (to or console).print(table)


def kv_table(title: str, rows: dict) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows.items():
        table.add_row(str(k), "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v))
    return table


def renamed(ctx: typer.Context, new_value, old_value, new: str, old: str):
    """The value of an option that was renamed from `old` to `new`: the old name still works, with a note
    on stderr; giving both is a usage error."""
    if old_value is None:
        return new_value
    source = ctx.get_parameter_source(new.lstrip("-").replace("-", "_"))
    if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
        raise typer.BadParameter(f"{old} is the old name of {new}; give only {new}", param_hint=old)
    err_console.print(f"note: {old} is now {new} ({old} still works but is deprecated)", highlight=False)
    return old_value
