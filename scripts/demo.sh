#!/usr/bin/env bash
# The main job from a fresh clone: install what is needed (scripts/setup.sh), then boot a VM from a
# small image and run a command in it (scripts/demo.js). Extra arguments are the command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
exec node scripts/demo.js "$@"
