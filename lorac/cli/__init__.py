"""The `lorac` command line: one module per subcommand under lorac/cli/.

Each subcommand module defines ``register(subparsers)``, which adds its parser
and sets ``func`` (called with the parsed args; returns an exit code or None).
Bad input ends with a one-line error on stderr and a non-zero exit code.
"""

import argparse
import importlib
import sys

# Subcommand modules, in the order `lorac --help` lists them.
COMMAND_MODULES = ["demo", "info", "convert", "merge", "combine", "extract", "similarity", "rank"]


class CommandError(Exception):
    """An error to report to the user as one line (exit code 2)."""


def build_parser():
    from .. import __version__

    parser = argparse.ArgumentParser(prog="lorac", description="LoRA adapters with a fused C core.")
    parser.add_argument("--version", action="version", version=f"lorac {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except (CommandError, ValueError, TypeError, KeyError, OSError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"lorac {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorac {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)
