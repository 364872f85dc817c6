"""The one exception type that CLIs turn into a one-line error and a non-zero exit."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import NoReturn


class ModelError(Exception):
    """A user-facing problem (bad file, bad flag, missing dependency): message is one line."""


def require_extra(extra: str, *modules: str) -> None:
    """A one-line ModelError naming the pip extra to install when an optional module is missing."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ModelError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: "
                         f"pip install -e \".[{extra}]\" (the {extra} extra; make setup installs it)")


class CliParser(argparse.ArgumentParser):
    """argparse whose errors are a ModelError: run_cli prints one line instead of usage + exit 2."""

    def error(self, message: str) -> None:
        raise ModelError(f"{message} (see --help)")


def run_cli(main: Callable[[], int | None]) -> NoReturn:
    """Run a CLI entry point; a ModelError becomes `error: ...` on stderr and exit 2."""
    try:
        code = main()
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
