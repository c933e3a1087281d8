"""Run several mergekit recipes in one process of the mergekit reference environment.

Usage (with mergekit's own python): ``python mergekit_driver.py JOBS.json``, where the file holds a list of
``{"recipe": PATH, "out": FOLDER, "seed": N or null, "kind": "merge" | "moe" | "multi", "options": {...}}``.
Kept apart from mtool: it imports only mergekit and is never imported by the tests themselves.
"""

import json
import sys

import yaml


def _merge(job):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(copy_tokenizer=True, lazy_unpickle=False, quiet=True, write_model_card=False,
                           random_seed=job.get("seed"), lora_merge_cache=job["out"] + ".lora-cache",
                           **job.get("options", {}))
    with open(job["recipe"], encoding="utf-8") as handle:
        text = handle.read()
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), job["out"], options=options,
              config_source=text)


def _moe(job):
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build

    with open(job["recipe"], encoding="utf-8") as handle:
        config = MoEMergeConfig.model_validate(yaml.safe_load(handle))
    options = MergeOptions(quiet=True, random_seed=job.get("seed"), write_model_card=False,
                           **job.get("options", {}))
    if job.get("seed") is not None:
        import transformers

        transformers.trainer_utils.set_seed(job["seed"])
    build(config, job["out"], merge_options=options, **job.get("build", {}))


def _multi(job):
    from mergekit.scripts.multimerge import main as multimerge

    arguments = [job["recipe"], "--intermediate-dir", job["out"] + ".stages", "--out-path", job["out"],
                 "--no-write-model-card", "--quiet"]
    if job.get("seed") is not None:
        arguments += ["--random-seed", str(job["seed"])]
    multimerge.main(arguments, standalone_mode=False)


def main(path):
    with open(path, encoding="utf-8") as handle:
        jobs = json.load(handle)
    for job in jobs:
        try:
            {"merge": _merge, "moe": _moe, "multi": _multi}[job.get("kind", "merge")](job)
        except Exception as error:  # reported per job: the caller decides whether a failure is expected
            with open(job["out"] + ".error", "w", encoding="utf-8") as handle:
                handle.write(f"{type(error).__name__}: {error}")


if __name__ == "__main__":
    main(sys.argv[1])
