"""Reproducible outputs: ``SOURCE_DATE_EPOCH``, the reproducible-builds convention.

Weights are byte-identical across reruns of a command; so is everything around them once the time of the run is
fixed. When the environment variable ``SOURCE_DATE_EPOCH`` holds a Unix time (whole seconds since 1970-01-01
UTC), every output takes that time as its creation time (the lineage record's ``created``, the card's "made on")
and leaves out what only describes the moment of the run, not the artifact: durations and throughput
(``train_seconds``, ``tokens_per_s``, ``elapsed_s``) and the process's memory use. The whole output folder is
then byte-identical across reruns with the same inputs and settings (see https://reproducible-builds.org/specs/
source-date-epoch/). Without it, the current time and the measurements are recorded.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping
from typing import Any

from mtool.errors import InputError, shown

VARIABLE = "SOURCE_DATE_EPOCH"
# Metric keys that measure the run (time, speed, memory) rather than the model; left out when SOURCE_DATE_EPOCH is set.
MEASUREMENT_KEYS = frozenset({"train_seconds", "tokens_per_s", "elapsed_s", "memory_gib"})


def source_date_epoch() -> int | None:
    """The value of ``SOURCE_DATE_EPOCH`` (None when unset or empty); a value that is not a whole number of seconds
    is an error, as the convention asks."""
    value = os.environ.get(VARIABLE, "").strip()
    if not value:
        return None
    if not value.isdigit() or len(value) > 12:
        raise InputError(f"{VARIABLE} must be a Unix time in whole seconds, got {shown(value, 40)}",
                         where=f"the environment variable {VARIABLE}",
                         fix="set it to e.g. $(git log -1 --format=%ct), or unset it")
    return int(value)


def creation_time() -> str:
    """The time an output is created, ISO 8601 in UTC to the second: ``SOURCE_DATE_EPOCH`` when set, else now."""
    epoch = source_date_epoch()
    moment = _dt.datetime.now(_dt.timezone.utc) if epoch is None else \
        _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc)
    return moment.isoformat(timespec="seconds")


def recorded_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` as an output records them: without the measurements of the run when ``SOURCE_DATE_EPOCH`` is set."""
    if source_date_epoch() is None:
        return dict(metrics)
    return {key: value for key, value in metrics.items() if key not in MEASUREMENT_KEYS}
