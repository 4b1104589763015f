"""The ``nosasim`` command line.

Each sub-command lives in its own module ``nosasim/cli/cmd_<name>.py`` exposing
``register(subparsers)``; modules are discovered at start-up so that adding a
command never means editing a central table.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nosasim",
        description=(
            "Replay KV-block selection traces through a model of a GPU block cache, "
            "PCIe links, HBM and compute; predict decode step time, throughput and memory."
        ),
    )
    from nosasim import __version__

    parser.add_argument("--version", action="version", version=f"nosasim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    package = importlib.import_module(__name__)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("cmd_"):
            importlib.import_module(f"{__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        # Bad input is the user's to fix: one clear line, no traceback.
        print(f"nosasim {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of our output went away (`nosasim ... | head`): not an error of ours. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        # Ctrl-C: outputs are written atomically, so nothing half-written is left; say so in one line.
        print(f"nosasim {args.command}: interrupted; no output was written unless reported above", file=sys.stderr)
        return 130
    except OSError as exc:
        # The machine refused a read or write (an output folder that is a file, a full disk, no permission): also
        # one line; every output is written atomically, so nothing half-written is left behind.
        print(f"nosasim {args.command}: error: {os_error(exc)}", file=sys.stderr)
        return 1


def os_error(exc: OSError) -> str:
    """One line for an OSError: the path it concerns and the system's reason."""
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"


if __name__ == "__main__":
    sys.exit(main())
