"""The megamem command line: add, ask, list, show, forget, info, verify, repair, demo, bench (--json on all).

The commands live by group (memories, ops, health, serving, bench); what they share, and the one place a megamem
error becomes the command's warnings and one `error:` line, is in `context`.
"""

from __future__ import annotations

import typer
from transformers.utils import logging as transformers_logging

from . import bench, health, mcp, memories, ops, serving
from .context import CommandGroup

transformers_logging.set_verbosity_error()
transformers_logging.disable_progress_bar()

# in the order `megamem --help` lists them (the keys group comes last)
COMMANDS = {
    "add": memories.add,
    "ask": memories.ask,
    "list": memories.list_,
    "show": memories.show,
    "export": memories.export,
    "consolidate": ops.consolidate,
    "merge": ops.merge,
    "split": ops.split,
    "forget": memories.forget,
    "info": memories.info,
    "verify": health.verify,
    "repair": health.repair,
    "serve": serving.serve,
    "mcp": mcp.mcp,
    "train-memoryllm": bench.train_memoryllm,
    "demo": bench.demo,
    "bench": bench.bench,
}


def build_app() -> typer.Typer:
    """The Typer app with every command registered, its errors handled in one place (context.CommandGroup)."""
    built = typer.Typer(
        cls=CommandGroup,
        add_completion=False,
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        help="Long-term memory in a language model's weights.",
    )
    for name, command in COMMANDS.items():
        built.command(name)(command)
    built.add_typer(serving.keys_app, name="keys")
    return built


app = build_app()
