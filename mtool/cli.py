"""The ``mtool`` command line: a thin Click group.

Each command lives beside the code it drives (``mtool/<area>/commands.py``) and is imported only when
it is used or listed, so ``mtool --help`` stays fast: command modules import nothing heavy at import
time (torch, transformers, peft are imported inside the command functions).

Failures: an :class:`~mtool.errors.MtoolError` is printed as one line ``error: ...`` with its exit
code; any other exception is reported the same way with its type, and ``-v`` shows the traceback.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
import traceback

import click

from mtool import __version__
from mtool.errors import MtoolError
from mtool.ui import VERBOSITY

# Large tensors come and go by the hundred in a merge; backing them with transparent huge pages cuts the
# page faults of each fresh allocation by ~500x. PyTorch reads this once, when its allocator starts.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# command name -> "module:attribute"; the module is imported on first use.
COMMANDS: dict[str, str] = {
    "info": "mtool.commands_info:info",
    "merge": "mtool.merger.commands:merge",
    "adapters": "mtool.adapters.commands:adapters",
    "train": "mtool.train.commands:train",
    "estimate": "mtool.train.commands:estimate",
    "name": "mtool.naming.commands:name",
    "card": "mtool.naming.commands:card",
    "eval": "mtool.evaluate.commands:evaluate",
    "demo": "mtool.demo.commands:demo",
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported from ``COMMANDS`` only when needed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name in COMMANDS if self._load(name) is not None)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        return self._load(cmd_name)

    @staticmethod
    def _load(name: str) -> click.Command | None:
        module_name, attribute = COMMANDS[name].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and module_name.startswith(error.name):
                return None  # that part of mtool is not installed in this build
            raise
        return getattr(module, attribute)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MtoolError as error:
            _report(error, error.message, error.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as error:  # noqa: BLE001 - the one place unexpected errors are reported
            _report(error, f"unexpected {type(error).__name__}: {error}", 1, hint=True)


def _report(error: BaseException, message: str, code: int, hint: bool = False) -> None:
    if VERBOSITY.verbose:
        traceback.print_exception(error)
    click.echo(f"error: {message}", err=True)
    if hint and not VERBOSITY.verbose:
        click.echo("(run with -v for the traceback)", err=True)
    sys.exit(code)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="mtool")
@click.option("-v", "--verbose", count=True, help="More detail; with an error, the traceback.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def main(verbose: int, quiet: bool) -> None:
    """Train LoRA/QLoRA adapters, merge models and adapters, and publish them with standardized
    names and model cards."""
    VERBOSITY.verbose = verbose
    VERBOSITY.quiet = quiet


def run() -> None:
    """The ``mtool`` executable: the group, then a quick exit. Interpreter shutdown would otherwise spend a
    few tenths of a second collecting the garbage of the libraries a command imported (torch alone has some
    hundred thousand objects); frozen, they are left to the operating system, like the rest of the process.
    (Objects still in reference cycles then are not finalized; no command relies on that: outputs are written,
    closed and renamed into place, and temporary folders removed, before it returns.)"""
    try:
        main()
    finally:
        gc.freeze()


if __name__ == "__main__":  # pragma: no cover
    run()
