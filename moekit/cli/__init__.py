"""The ``moekit`` command: one subcommand per module of this package.

Each subcommand module defines ``add_parser(subparsers)``, which registers its parser with
``func=run``. Bad input (unknown config keys, missing files, corrupt or incompatible
checkpoints) ends with a one-line ``moekit <command>: error: ...`` and exit status 2; set
``MOEKIT_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from pathlib import Path

# Subcommand modules, in --help order. Add a module here to add a command.
COMMANDS = ("train", "generate", "eval", "plot", "convert", "vla")

USER_ERROR_STATUS = 2
PYTHON_WARNING_FORMAT = warnings.formatwarning  # kept so that repeated main() calls do not stack wrappers


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that describe bad input rather than a bug in moekit."""
    from moekit.train.checkpoint import CheckpointError
    from moekit.train.trainer import TrainingDiverged

    return (ValueError, TypeError, OSError, CheckpointError, TrainingDiverged)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description="Train and serve sparse Mixture-of-Experts LMs.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"moekit.cli.{name}").add_parser(subparsers)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like ``parser.parse_args``, but KEY=VALUE overrides may also follow an option
    (``train a=1 --no-sample b=2``): argparse's ``nargs="*"`` positional takes only the first run
    of them and would refuse the rest as unrecognized. They are appended in command-line order,
    so a later override of the same key still wins."""
    args, extras = parser.parse_known_args(argv)
    stray = [a for a in extras if a.startswith("-") or "=" not in a]
    if extras and not stray and isinstance(getattr(args, "overrides", None), list):
        args.overrides += extras
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def use_short_warnings(command: str) -> None:
    """Print moekit's own warnings (a dropped torn metrics line, ...) as one line for the user,
    like its errors; Python's default adds the moekit source line that raised it. Other
    libraries' warnings keep the default format, whose location is what one needs for them."""
    package = str(Path(__file__).resolve().parents[1]) + os.sep

    def short(message, category, filename, lineno, line=None):
        if str(Path(filename).resolve()).startswith(package):
            return f"moekit {command}: warning: {message}\n"
        return PYTHON_WARNING_FORMAT(message, category, filename, lineno, line)

    warnings.formatwarning = short


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    use_short_warnings(args.command)
    try:
        return args.func(args) or 0
    except user_errors() as exc:
        if os.environ.get("MOEKIT_DEBUG"):
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"moekit {args.command}: error: {message}", file=sys.stderr)
        return USER_ERROR_STATUS
    except KeyboardInterrupt:
        print(f"moekit {args.command}: interrupted", file=sys.stderr)
        return 130
