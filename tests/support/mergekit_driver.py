"""Run several mergekit recipes in one process of the mergekit reference environment.

Usage (with mergekit's own python): ``python mergekit_driver.py RECIPE OUT [RECIPE OUT ...]``.
Kept apart from mtool: it imports only mergekit and is never imported by the tests themselves.
"""

import sys

import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions


def main(arguments):
    options = MergeOptions(copy_tokenizer=False, lazy_unpickle=False, quiet=True)
    for recipe_path, out in zip(arguments[::2], arguments[1::2]):
        with open(recipe_path, encoding="utf-8") as handle:
            text = handle.read()
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), out, options=options, config_source=text)


if __name__ == "__main__":
    main(sys.argv[1:])
