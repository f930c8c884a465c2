"""The `megamem` console entry: runs the command line so that every failure ends in one `error:` line.

It imports nothing heavy itself, so an interrupt while torch loads is caught here too. Usage errors become
one line too; megamem's own errors were already printed by the command (exit 1); anything
unexpected becomes one line naming it (MEGAMEM_DEBUG=1 shows the traceback instead).
"""

from __future__ import annotations

import os
import sys


def run(argv: list[str]) -> int:
    """Run the command line on `argv` (without the program name); return the exit status."""
    try:
        import typer

        from .cli import app
        from .errors import MegamemError

        try:
            rc = app(args=argv, prog_name="megamem", standalone_mode=False)
            return rc if isinstance(rc, int) else 0
        except typer.Abort:
            raise KeyboardInterrupt from None
        except typer.Exit as exc:
            return exc.exit_code
        except MegamemError as exc:
            return _error(str(exc))
        except Exception as exc:
            if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
                raise
            # a usage error (typer's click): one line too, with where to read more
            ctx = getattr(exc, "ctx", None)
            command = f" {ctx.info_name}" if ctx is not None and ctx.parent is not None else ""
            return _error(f"{exc.format_message()} (see megamem{command} --help)")
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
