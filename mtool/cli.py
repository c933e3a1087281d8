"""The ``mtool`` command line: a thin Click group.

Each command lives beside the code it drives (``mtool/<area>/commands.py``) and is imported only when
it is used or listed, so ``mtool --help`` stays fast: command modules import nothing heavy at import
time (torch, transformers, peft are imported inside the command functions).

Failures: an :class:`~mtool.errors.MtoolError` is printed as one line ``error: ...`` with its exit
code (control characters and line breaks escaped); an operating-system error that escaped the commands (a full
disk, a read-only folder, a vanished file) is reported the same way with the path it concerns; any other exception
is reported with its type as "unexpected", and ``-v`` shows the traceback.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import sys
import traceback

import click

from mtool import __version__
from mtool.errors import MtoolError, printable
from mtool.ui import VERBOSITY, quiet_library_notices

# Large tensors come and go by the hundred in a merge; backing them with transparent huge pages cuts the
# page faults of each fresh allocation by ~500x. PyTorch reads this once, when its allocator starts.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# command name -> "module:attribute"; the module is imported on first use.
COMMANDS: dict[str, str] = {
    "info": "mtool.commands_info:info",
    "merge": "mtool.merger.commands:merge",
    "moe": "mtool.moe.commands:moe",
    "adapters": "mtool.adapters.commands:adapters",
    "train": "mtool.train.commands:train",
    "estimate": "mtool.train.commands:estimate",
    "name": "mtool.naming.commands:name",
    "card": "mtool.naming.commands:card",
    "eval": "mtool.evaluate.commands:evaluate",
    "demo": "mtool.demo.commands:demo",
    "export": "mtool.export.commands:export",
    "push": "mtool.publish.commands:push",
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
        except OSError as error:
            translated = _system_error(error)
            _report(error, translated.message, translated.exit_code)
        except Exception as error:  # noqa: BLE001 - the one place unexpected errors are reported
            _report(error, f"unexpected {type(error).__name__}: {str(error)[:500]}", 1, hint=True)


def _system_error(error: OSError) -> MtoolError:
    """An operating-system error as a one-line message: a disk failure as the output layer reports it, any other
    with its path."""
    from pathlib import Path

    from mtool.io.folders import disk_error_of

    path = Path(os.fsdecode(error.filename)) if error.filename else Path.cwd()
    translated = disk_error_of(error, path.parent if error.filename else path)
    if translated is not None and error.errno not in (errno.EACCES, errno.EPERM):  # those may concern an input
        return translated
    return MtoolError(f"the operating system refused: {error.strerror or type(error).__name__}",
                      where=str(path) if error.filename else None,
                      fix="check the path, its permissions and the free space")


MAX_MESSAGE = 2000  # characters: the end (where, what to do) is kept when a message is cut


def _report(error: BaseException, message: str, code: int, hint: bool = False) -> None:
    if VERBOSITY.verbose:
        traceback.print_exception(error)
    line = printable(message)
    if len(line) > MAX_MESSAGE:
        line = f"{line[:MAX_MESSAGE // 2]} [...] {line[-MAX_MESSAGE // 2:]}"
    click.echo(f"error: {line}", err=True)
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
    if not verbose:
        quiet_library_notices()


def run() -> None:
    """The ``mtool`` executable: the group, then an immediate exit.

    Every command has written, closed and renamed its outputs (and removed its temporary folders) before it
    returns, so the process leaves without the interpreter's teardown: collecting the objects of the libraries a
    command imported took a few tenths of a second (torch alone has some hundred thousand objects), and native
    extensions that check for leaks at teardown (nanobind's, in Triton, which bitsandbytes imports) would print
    pages of warnings about objects still alive. Standard streams are flushed first.
    """
    code: object = 0
    try:
        main()
    except SystemExit as exit_request:
        code = exit_request.code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        code = 130
    finally:
        if isinstance(code, str):  # sys.exit("message"): printed, status 1, as the interpreter would
            print(code, file=sys.stderr)
            code = 1
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    run()
