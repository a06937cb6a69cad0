"""What every command-line entry point shares: a help formatter that shows defaults, and one-line errors.

    @command
    def main(argv=None) -> int:
        parser = argument_parser("what the command does", module=__name__)
        ...

A decorated `main` turns the project's own errors (ConfigError, CheckpointError, TokenizerError, ... all
ValueErrors), missing files and missing optional packages into `error: <message>` on stderr and exit
status 2 (1 for the failures listed in `failures=`) instead of a traceback. QWEN35_TRACEBACK=1 in the
environment re-raises them, for bug reports.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

USAGE = 2    # bad input: arguments, config, files (argparse's status for bad arguments too)
FAILED = 1   # the command ran and failed (a check did not pass, a run diverged)
EXPECTED = (ValueError, OSError, ImportError)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to options that have a meaningful default; keeps descriptions as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def argument_parser(description: str, module: str | None = None, **kwargs) -> argparse.ArgumentParser:
    """A parser showing defaults. `module`: the CLI's `__name__`; when that is "__main__" and Python was started
    with `-m`, usage reads `python -m train.demo` (argparse alone says `demo.py`)."""
    running = getattr(sys.modules.get("__main__"), "__spec__", None)
    if module == "__main__" and running is not None:
        kwargs.setdefault("prog", f"python -m {running.name}")
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter, **kwargs)


def error_message(error: BaseException) -> str:
    """One line for a user: the message, with the file of an OSError and the package of an ImportError."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    if isinstance(error, ModuleNotFoundError) and error.name and str(error).startswith("No module named"):
        return f"this command needs the Python package {error.name!r}, which is not installed"
    return str(error) or type(error).__name__


def command(main=None, *, failures: tuple[type[BaseException], ...] = ()):
    """Decorates a CLI `main(argv) -> int`: expected errors become one line on stderr and exit status USAGE
    (errors of the types in `failures`: FAILED); anything else keeps its traceback (a bug to report)."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(argv=None) -> int:
            try:
                return fn(argv)
            except failures + EXPECTED as e:
                if os.environ.get("QWEN35_TRACEBACK"):
                    raise
                print(f"error: {error_message(e)}", file=sys.stderr)
                return FAILED if isinstance(e, failures) else USAGE
            except KeyboardInterrupt:
                print("interrupted", file=sys.stderr)
                return 130
        return wrapper
    return decorate(main) if main is not None else decorate
