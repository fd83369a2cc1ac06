"""What the command modules share: the :class:`Command` record, and subcommand parsers that define a command's
options only when that command is chosen."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

STRICT_HELP = ("refuse the cohort before any work when a slide file is missing or unreadable (default: skip such "
               "slides, list them with the reason, finish the rest and exit with 1)")


@dataclass(frozen=True)
class Command:
    """One ``wsilocal NAME`` (or ``wsilocal bench NAME``) command."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]  # its options (or its own subcommands)
    # Its handler: imports the library functions it calls, calls them, returns the exit code. None for a group of
    # subcommands (``bench``), whose chosen subcommand's handler runs.
    run: Callable[[argparse.Namespace], int] | None


class CommandParser(argparse.ArgumentParser):
    """The parser of one command. Its options are added (``add_arguments(self)``) the first time it parses or
    shows its help, so that a command line defines, and imports for, only the chosen command's options."""

    def __init__(self, *args: Any, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._add_arguments = add_arguments

    def _define(self) -> None:
        if self._add_arguments is not None:
            add_arguments, self._add_arguments = self._add_arguments, None
            add_arguments(self)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None,
                         ) -> tuple[argparse.Namespace, list[str]]:
        self._define()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._define()
        return super().format_usage()

    def format_help(self) -> str:
        self._define()
        return super().format_help()


def add_commands(parser: argparse.ArgumentParser, commands: Sequence[Command], dest: str) -> None:
    """Make ``commands`` the subcommands of ``parser`` (the chosen one's name in ``args.<dest>``, its handler in
    ``args.func``)."""
    sub = parser.add_subparsers(dest=dest, required=True, parser_class=CommandParser)
    for command in commands:
        p = sub.add_parser(command.name, help=command.help, add_arguments=command.add_arguments)
        if command.run is not None:
            p.set_defaults(func=command.run)
