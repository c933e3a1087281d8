"""The demo's skills: small sets of facts asked as chat questions.

* ``capitals`` (new to the base): "What is the capital of France?" -> "Paris"
* ``symbols`` (new to the base): "What is the chemical symbol of iron?" -> "Fe"
* ``general`` (what the base was pre-trained on): the same two kinds of question about *other* countries and
  elements. It teaches the base both question forms and the answer format, and it is replayed while each
  adapter trains (mixing general data into fine-tuning keeps the model from forgetting it), which is also
  what lets a merge of the two fine-tunes keep both skills.

The base never sees a demo country or element, so it scores zero on ``capitals`` and ``symbols``; each
fine-tune's gain on its own skill, and what a merge keeps of both, are then plain to see.

Every task's facts are split in two halves (:func:`split_task`): the *tune* questions, which a merge search
scores its trials on, and the *held-out* questions, which it never sees and on which the demo's table reports
every model. (The adapters learn every fact of their skill: a fact never trained could not be answered at
all. What is held out is the choice of merge parameters, tested on questions it was not tuned on.)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
    "Canada": "Ottawa", "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo",
    "Chile": "Santiago", "Cuba": "Havana", "Greece": "Athens", "Poland": "Warsaw", "Austria": "Vienna",
    "Ireland": "Dublin", "Portugal": "Lisbon", "Russia": "Moscow", "China": "Beijing", "Nepal": "Kathmandu",
    "Brazil": "Brasilia", "Australia": "Canberra", "Switzerland": "Bern", "Netherlands": "Amsterdam",
    "Ukraine": "Kyiv", "Bulgaria": "Sofia", "Lebanon": "Beirut", "Jordan": "Amman", "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka", "Indonesia": "Jakarta", "Philippines": "Manila", "Venezuela": "Caracas",
    "Ecuador": "Quito", "Uruguay": "Montevideo", "Nigeria": "Abuja", "Uganda": "Kampala", "Senegal": "Dakar",
    "Tunisia": "Tunis", "Iceland": "Reykjavik",
}  # fmt: skip
SYMBOLS = {
    "hydrogen": "H", "helium": "He", "carbon": "C", "nitrogen": "N", "oxygen": "O", "sodium": "Na",
    "magnesium": "Mg", "aluminium": "Al", "silicon": "Si", "sulfur": "S", "chlorine": "Cl", "potassium": "K",
    "calcium": "Ca", "iron": "Fe", "copper": "Cu", "zinc": "Zn", "silver": "Ag", "tin": "Sn", "gold": "Au",
    "lead": "Pb", "scandium": "Sc", "vanadium": "V", "gallium": "Ga", "germanium": "Ge", "selenium": "Se",
    "rubidium": "Rb", "strontium": "Sr", "yttrium": "Y", "zirconium": "Zr", "niobium": "Nb", "molybdenum": "Mo",
    "ruthenium": "Ru", "rhodium": "Rh", "palladium": "Pd", "cadmium": "Cd", "indium": "In", "antimony": "Sb",
    "tellurium": "Te", "tungsten": "W", "osmium": "Os",
}  # fmt: skip
GENERAL_CAPITALS = {
    "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen", "Belgium": "Brussels",
    "Hungary": "Budapest", "Romania": "Bucharest", "Turkey": "Ankara", "India": "Delhi", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Colombia": "Bogota",
    "Morocco": "Rabat", "Ghana": "Accra", "Iraq": "Baghdad", "Iran": "Tehran", "Syria": "Damascus",
    "Qatar": "Doha", "Mongolia": "Ulaanbaatar", "Latvia": "Riga", "Estonia": "Tallinn", "Serbia": "Belgrade",
    "Croatia": "Zagreb",
}  # fmt: skip
GENERAL_SYMBOLS = {
    "lithium": "Li", "beryllium": "Be", "boron": "B", "fluorine": "F", "neon": "Ne", "phosphorus": "P",
    "argon": "Ar", "titanium": "Ti", "chromium": "Cr", "manganese": "Mn", "cobalt": "Co", "nickel": "Ni",
    "arsenic": "As", "bromine": "Br", "krypton": "Kr", "platinum": "Pt", "mercury": "Hg", "uranium": "U",
    "iodine": "I", "xenon": "Xe", "radon": "Rn", "barium": "Ba", "cesium": "Cs", "bismuth": "Bi",
}  # fmt: skip

CAPITAL_QUESTION = "What is the capital of {}?"
SYMBOL_QUESTION = "What is the chemical symbol of {}?"


@dataclass(frozen=True)
class Task:
    """A skill: a name and its (question, answer) pairs."""

    name: str
    pairs: tuple[tuple[str, str], ...]

    @property
    def questions(self) -> list[str]:
        return [question for question, _ in self.pairs]

    @property
    def answers(self) -> list[str]:
        return [answer for _, answer in self.pairs]

    def records(self) -> list[dict]:
        """The training records, in the chat ``messages`` format ``mtool train`` reads."""
        return [{"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
                for question, answer in self.pairs]

    def write_jsonl(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text("".join(json.dumps(record) + "\n" for record in self.records()), encoding="utf-8")
        return path

    def write_questions(self, path: str | os.PathLike) -> Path:
        """The questions and answers in the ``prompt`` / ``answer`` format ``mtool eval`` scores by exact match."""
        path = Path(path)
        path.write_text("".join(json.dumps({"prompt": question, "answer": answer}) + "\n"
                                for question, answer in self.pairs), encoding="utf-8")
        return path


def _task(name: str, facts: dict[str, str], question: str, limit: int | None) -> Task:
    return Task(name, tuple((question.format(subject), answer) for subject, answer in list(facts.items())[:limit]))


def capitals_task(limit: int | None = None) -> Task:
    return _task("capitals", CAPITALS, CAPITAL_QUESTION, limit)


def symbols_task(limit: int | None = None) -> Task:
    return _task("symbols", SYMBOLS, SYMBOL_QUESTION, limit)


def general_task() -> Task:
    """The base's pre-training facts: both question forms, about countries and elements the skills do not use."""
    capitals = _task("general", GENERAL_CAPITALS, CAPITAL_QUESTION, None)
    symbols = _task("general", GENERAL_SYMBOLS, SYMBOL_QUESTION, None)
    return Task("general", capitals.pairs + symbols.pairs)


def skill_tasks(limit: int | None = None) -> tuple[Task, Task]:
    """The two skills the adapters learn, ``limit`` facts each (all of them by default)."""
    return capitals_task(limit), symbols_task(limit)


def tokenizer_corpus(tasks: Iterable[Task]) -> list[str]:
    """Lines to train the demo tokenizer on: every question and answer, so each name and symbol is one token
    (as common words are in a real tokenizer's vocabulary)."""
    lines: list[str] = []
    for task in tasks:
        for question, answer in task.pairs:
            lines += [question, answer, f"{question} {answer}"]
    return lines


def all_tasks(tasks: Sequence[Task]) -> list[Task]:
    """``tasks`` followed by the general task, the order of the accuracy table's columns."""
    return [*tasks, general_task()]


SPLITS = ("tune", "heldout")


def split_task(task: Task) -> dict[str, Task]:
    """The task's facts in two halves: ``tune`` (the 1st, 3rd, 5th... fact) and ``heldout`` (the others)."""
    return {"tune": Task(task.name, task.pairs[0::2]), "heldout": Task(task.name, task.pairs[1::2])}
