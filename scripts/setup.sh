#!/usr/bin/env bash
# Create or update the project's virtual environment in .venv (idempotent; fast when nothing changed).
#   MTOOL_TORCH   the torch requirement installed first (default torch==2.13.0, the CPU build;
#                 on a GPU machine use e.g. MTOOL_TORCH="torch" to get the CUDA build)
#   MTOOL_EXTRAS  extras to install (default "test")
#   MTOOL_MERGEKIT=1 also builds .mkvenv, a separate venv with mergekit 0.1.5 used as the merge reference
#   MTOOL_LLAMA_CPP=1 also builds llama-cpp-python (llama.cpp itself, the GGUF reference) into .venv: PyPI has only
#                 its source, about 15 minutes of compiling on 2 cores the first time; pip's wheel cache makes any
#                 later install (a new .venv) take seconds. CMAKE_ARGS is passed to its build (default: no
#                 multimodal library, which nothing here uses).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
torch_requirement=${MTOOL_TORCH:-torch==2.13.0}
extras=${MTOOL_EXTRAS:-test}

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$python" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
# torch first: an unpinned torch pulled in by a dependency would bring a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing $torch_requirement" >&2
  .venv/bin/python -m pip install -q "$torch_requirement"
fi
stamp=.venv/.mtool-installed
# pyproject.toml and the C helper's sources: a change to either reinstalls (and rebuilds the helper in place)
want="$(cat pyproject.toml mtool/merger/methods/_sortpath.c mtool/merger/methods/_sortpath_body.h \
        | sha256sum | cut -d' ' -f1) $extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing mtool[$extras]" >&2
  # compat: a plain path entry (no import hook, and no warning box about folders shadowing the package);
  # PYTHONWARNINGS: setuptools' notices about its own options (ext-modules, editable modes) are not the user's
  PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q -e ".[$extras]" --config-settings editable_mode=compat
  echo "$want" > "$stamp"
fi

if [ "${MTOOL_MERGEKIT:-0}" = "1" ] && [ ! -x .mkvenv/bin/mergekit-yaml ]; then
  echo "setup: installing the mergekit reference into .mkvenv" >&2
  "$python" -m venv .mkvenv
  .mkvenv/bin/python -m pip install -q --upgrade pip
  .mkvenv/bin/python -m pip install -q "$torch_requirement"
  .mkvenv/bin/python -m pip install -q "mergekit==0.1.5" \
    || echo "setup: mergekit could not be installed; the comparison tests will be skipped" >&2
fi

if [ "${MTOOL_LLAMA_CPP:-0}" = "1" ] && ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  echo "setup: installing llama-cpp-python 0.3.36 (built from source the first time: about 15 minutes)" >&2
  started=$(date +%s)
  if CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" .venv/bin/python -m pip install -q "llama-cpp-python==0.3.36"; then
    echo "setup: llama-cpp-python installed in $(( $(date +%s) - started )) s" >&2
  else
    echo "setup: llama-cpp-python could not be built; the tests that run llama.cpp will be skipped" >&2
  fi
fi
