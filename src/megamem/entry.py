"""The `megamem` console entry: runs the command line so that every failure ends in one `error:` line.

It imports nothing heavy itself, so an interrupt while torch loads is caught here too. Usage errors keep
click's own message (exit 2); megamem's own errors were already printed by the command (exit 1); anything
unexpected becomes one line naming it (MEGAMEM_DEBUG=1 shows the traceback instead).
"""

from __future__ import annotations

import os
import sys


def run(argv: list[str]) -> int:
    """Run the command line on `argv` (without the program name); return the exit status."""
    try:
        import click

        from .cli import app
        from .errors import MegamemError

        try:
            rc = app(args=argv, prog_name="megamem", standalone_mode=False)
            return rc if isinstance(rc, int) else 0
        except click.exceptions.Abort:
            raise KeyboardInterrupt from None
        except click.ClickException as exc:
            exc.show()
            return exc.exit_code
        except click.exceptions.Exit as exc:
            return exc.exit_code
        except MegamemError as exc:
            return _error(str(exc))
    except KeyboardInterrupt:
        return _error("interrupted", 130)
    except Exception as exc:
        if os.environ.get("MEGAMEM_DEBUG"):
            raise
        if isinstance(exc, OSError):
            where = f": {exc.filename}" if exc.filename else ""
            return _error(f"{exc.strerror or exc}{where}")
        first = str(exc).splitlines()[0] if str(exc) else ""
        return _error(f"internal error ({type(exc).__name__}: {first}); MEGAMEM_DEBUG=1 shows the traceback")


def _error(message: str, code: int = 1) -> int:
    from .checks import printable_line

    print(f"error: {printable_line(message)}", file=sys.stderr)
    return code


def main() -> None:  # pragma: no cover - console entry
    sys.exit(run(sys.argv[1:]))
