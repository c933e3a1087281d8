"""Results kept with the model: each evaluation added to the folder's lineage record (a newer measurement of
the same task on the same data replaces the older one) and the card written again from the record, so its
``model-index`` shows them on the Hub.

The record is updated under a lock and replaced atomically (:func:`mtool.lineage.update_lineage`); the card is
derived from it and written atomically after. Weights are never touched. A folder without a record (not made by
mtool), a Hub download, or a card not written by mtool is left as it is, and the user is told.
"""

from __future__ import annotations

from collections.abc import Sequence

from mtool import ui
from mtool.evaluate.results import TaskResult
from mtool.hub import ModelRef
from mtool.lineage import Lineage, update_lineage
from mtool.naming.card import refresh_card


def record_results(ref: ModelRef, results: Sequence[TaskResult], *, base: str | None) -> bool:
    """Add ``results`` to the lineage record and card of the folder ``ref``; True when recorded."""
    if ref.is_hub:
        ui.info(f"  not recorded: {ref.id} is a Hub download (its cache is not changed); see --json or --chart")
        return False
    evaluations = [result.evaluation(base) for result in results]
    replaced = {evaluation.key() for evaluation in evaluations}

    def add(record: Lineage) -> None:
        kept = [old for old in record.evaluations or [] if old.key() not in replaced]
        record.evaluations = kept + evaluations

    try:
        if update_lineage(ref.path, add) is None:
            ui.info(f"  not recorded: {ref.id} has no mtool lineage record")
            return False
        card = refresh_card(ref.path)
    except OSError as error:
        ui.warn(f"could not record the results in {ref.path}: {error.strerror or error}")
        return False
    ui.info(f"  recorded in {ref.id}/mtool-lineage.json" + (" and its card" if card else " (no mtool card to update)"))
    return True
