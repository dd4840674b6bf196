#!/usr/bin/env bash
# Leave reports/ and results/ behind for one device call, and bring them back after it.
#
#   scripts/travel_light.sh on     # before the call that carries QuACK's wheels
#   scripts/travel_light.sh off    # right after it, before landing or committing anything
#   scripts/travel_light.sh status
#
# Why: a device call sends the working tree (tracked files and untracked ones git does not ignore) with
# the carried paths, 64 MiB in all. QuACK's wheelhouse (scripts/wheelhouse.sh .whl quack) is ~62 MB, and
# the committed reports and results grow with every run (13 MB on 2026-12-02): together they are over the
# limit. The device needs neither (a new run writes its own; only `run --resume` reads results/, and
# gpu_session.sh's second stage starts a new run), so `on` takes them out of git's index (the files stay on
# disk, untouched) and ignores them in .git/info/exclude, and `off` puts the index back as HEAD has it.
# Between the two, `git add -A` would record their deletion: `on` refuses with anything staged, and
# scripts/land_gpu_run.py refuses to land while it is on.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
EXCLUDE=$(git rev-parse --git-path info/exclude)
MARK="# cebench travel-light: scripts/travel_light.sh off undoes the next two lines"
PATHS=(reports results)

is_on() { [[ -f $EXCLUDE ]] && grep -qxF "$MARK" "$EXCLUDE"; }

case ${1:-status} in
  on)
    if is_on; then echo "travel-light is already on"; exit 0; fi
    if ! git diff --cached --quiet; then
      echo "travel_light: refusing, the index has staged changes (commit or unstage them first)" >&2; exit 1
    fi
    git rm -r -q --cached -- "${PATHS[@]}"
    mkdir -p "$(dirname "$EXCLUDE")"
    printf '%s\n/reports/\n/results/\n' "$MARK" >> "$EXCLUDE"
    echo "travel-light on: ${PATHS[*]} stay on disk and no longer travel; run 'scripts/travel_light.sh off' after the call"
    ;;
  off)
    if is_on; then
      # drop the mark and the two lines after it, nothing else of the user's excludes
      awk -v mark="$MARK" '$0 == mark {skip = 3} skip > 0 {skip--; next} {print}' "$EXCLUDE" > "$EXCLUDE.tmp"
      mv "$EXCLUDE.tmp" "$EXCLUDE"
    fi
    git reset -q -- "${PATHS[@]}"
    echo "travel-light off: ${PATHS[*]} are tracked as HEAD has them"
    ;;
  status)
    if is_on; then echo "on"; else echo "off"; fi
    ;;
  *)
    echo "usage: scripts/travel_light.sh on|off|status" >&2; exit 2
    ;;
esac
