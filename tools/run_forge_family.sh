#!/usr/bin/env bash
# Run tests/integration/test_forge_family.py against a Forge or reForge lab built by ../shared/labs
# (its lab.env, venv and webui/), on PROJECT's committed HEAD (like the A1111 lab's run_integration.sh).
#   LAB=/work/labs/forge  PROJECT=$PWD bash tools/run_forge_family.sh [pytest args, e.g. -k sdxl]
#   LAB=/work/labs/reforge PROJECT=$PWD bash tools/run_forge_family.sh
# The checkout is cloned to $LAB/itest on a branch (Forge reads the extension's git data and prints a
# traceback for a detached HEAD), linked as webui/extensions/sd-webui-pivotal, and tested with
# PROJECT's .venv. SDXL: set PIVOTAL_FORGE_SDXL_CHECKPOINT (or PIVOTAL_REFORGE_…) to a checkpoint the
# webui lists (tools/make_random_sdxl.py writes one). Output: $LAB/integration.log. One webui at a time.
set -u
LAB=${LAB:?set LAB to a Forge or reForge lab folder}; PROJECT=${PROJECT:-$PWD}
. "$LAB/lab.env" || exit 1
kind=$([ "$(basename "$LAB")" = reforge ] && echo reforge || echo forge)
ITEST=$LAB/itest
if [ -d "$ITEST/.git" ]; then git -C "$ITEST" fetch -q "$PROJECT" HEAD && git -C "$ITEST" checkout -q -B itest FETCH_HEAD || exit 1
else git clone -q "$PROJECT" "$ITEST" && git -C "$ITEST" checkout -q -B itest || exit 1; fi
ln -sfn "$PROJECT/.venv" "$ITEST/.venv"
echo "testing $(git -C "$ITEST" log -1 --format='%h %s' | cut -c1-100) on $kind"
ln -sfn "$ITEST" "$LAB/webui/extensions/sd-webui-pivotal"
cd "$ITEST" || exit 1
sel=$([ "$kind" = forge ] && echo "not reforge" || echo reforge)
prefix=PIVOTAL_${kind^^}
env "${prefix}_DIR=$LAB/webui" "${prefix}_PYTHON=$LAB/venv/bin/python" "${prefix}_ARGS=$LAB_ARGS" \
  PIVOTAL_SCREENSHOTS="$LAB/screenshots" \
  .venv/bin/python -m pytest -v -rA --durations=0 -p no:cacheprovider tests/integration/test_forge_family.py \
  -k "$sel" "$@" 2>&1 | tee "$LAB/integration.log"
exit "${PIPESTATUS[0]}"
