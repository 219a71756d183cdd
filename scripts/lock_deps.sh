#!/usr/bin/env bash
# Regenerate constraints.txt, the lock of every dependency (all extras) that README's install and .ci/run use:
#   scripts/lock_deps.sh                 # the newest releases that satisfy pyproject.toml, torch kept at 2.13.0
#   TORCH=2.14.1 scripts/lock_deps.sh    # move torch too
# Then reinstall (README's two commands) and run the whole suite before committing the new lock.
set -euo pipefail
cd "$(dirname "$0")/.."
uv pip compile pyproject.toml --all-extras --universal --python-version 3.11 \
  --overrides <(echo "torch==${TORCH:-2.13.0}") \
  --custom-compile-command "scripts/lock_deps.sh" --quiet -o constraints.txt
