"""Console output that respects ``--quiet`` and ``--verbose``: messages go to stderr, data to stdout."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class Verbosity:
    """Process-wide output level set once by the CLI: quiet < normal < verbose."""

    verbose: int = 0
    quiet: bool = False


VERBOSITY = Verbosity()


def info(message: str) -> None:
    """A progress message for people (stderr); silenced by ``--quiet``."""
    if not VERBOSITY.quiet:
        print(message, file=sys.stderr, flush=True)


def debug(message: str) -> None:
    """A detail shown only with ``-v``."""
    if VERBOSITY.verbose and not VERBOSITY.quiet:
        print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """A warning; shown even with ``--quiet``."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


# Libraries whose import-time notices are about their own optional extras, not about the user's work
# (bitsandbytes, on CPUs with AVX512-BF16, reports a kernel package it could not fetch from the Hub).
LIBRARY_LOGGERS = ("bitsandbytes",)


# Libraries whose deprecation notices are about their calls into each other (PEFT calling a transformers API that
# transformers 6 removes), which a user of mtool can do nothing about.
LIBRARY_MODULES = r"(transformers|peft|torch|bitsandbytes|accelerate|datasets)(\..*)?"


def quiet_library_notices() -> None:
    """Show only errors from :data:`LIBRARY_LOGGERS`, and no deprecation notices raised inside
    :data:`LIBRARY_MODULES` (``-v`` leaves both as they are)."""
    import logging
    import warnings

    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=LIBRARY_MODULES)


@contextlib.contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """Only errors from the logger ``name`` for the ``with`` block (a library's own warnings that mtool reports
    better itself); its level is restored after."""
    import logging

    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def quiet_unless_verbose() -> Iterator[None]:
    """Silence messages and progress bars for the ``with`` block, unless ``-v`` was given; then restore."""
    saved = (VERBOSITY.verbose, VERBOSITY.quiet)
    VERBOSITY.quiet = VERBOSITY.quiet or not VERBOSITY.verbose
    try:
        yield
    finally:
        VERBOSITY.verbose, VERBOSITY.quiet = saved


def progress(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it", unit_scale: bool = False):
    """A tqdm progress bar on stderr, disabled by ``--quiet`` or when stderr is not a terminal."""
    from tqdm.auto import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit_scale,
        disable=VERBOSITY.quiet or not sys.stderr.isatty(),
        file=sys.stderr,
        dynamic_ncols=True,
    )
