#!/usr/bin/env bash
# Leave reports/ and results/ behind for one device call, and bring them back after it.
#
#   scripts/travel_light.sh on     # before the call that carries QuACK's wheels
#   scripts/travel_light.sh off    # right after it, before landing or committing anything
#   scripts/travel_light.sh status
#
# Why: a device call sends the working tree (tracked files and untracked ones git does not ignore) with
# the carried paths, 64 MiB in all. QuACK's wheelhouse (scripts/wheelhouse.sh .whl quack) is 58.7 MiB, and
# the committed reports and results grow with every run (13 MB on 2026-12-02): together they are over the
# limit. The device needs neither (a new run writes its own; only `run --resume` reads results/, and
# gpu_session.sh's second stage starts a new run), so `on` takes them out of git's index (the files stay on
# disk, untouched) and ignores them in .git/info/exclude, and `off` puts the index back as HEAD has it.
# While it is on, the index holds their deletion, which any commit would record: `on` refuses with anything
# staged and installs a pre-commit hook that refuses every commit until `off` removes it, and
# scripts/land_gpu_run.py refuses to land.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
EXCLUDE=$(git rev-parse --git-path info/exclude)
HOOK=$(git rev-parse --git-path hooks/pre-commit)
MARK="# cebench travel-light: scripts/travel_light.sh off undoes the next two lines"
PATHS=(reports results)

is_on() { [[ -f $EXCLUDE ]] && grep -qxF "$MARK" "$EXCLUDE"; }

case ${1:-status} in
  on)
    if is_on; then echo "travel-light is already on"; exit 0; fi
    if ! git diff --cached --quiet; then
      echo "travel_light: refusing, the index has staged changes (commit or unstage them first)" >&2; exit 1
    fi
    if [[ -e $HOOK ]]; then
      echo "travel_light: refusing, $HOOK exists (its guard against committing meanwhile would replace it)" >&2; exit 1
    fi
    git rm -r -q --cached --ignore-unmatch -- "${PATHS[@]}"
    mkdir -p "$(dirname "$EXCLUDE")" "$(dirname "$HOOK")"
    # a last line without its newline would swallow the mark
    if [[ -s $EXCLUDE && -n $(tail -c1 "$EXCLUDE") ]]; then echo >> "$EXCLUDE"; fi
    printf '%s\n/reports/\n/results/\n' "$MARK" >> "$EXCLUDE"
    cat > "$HOOK" <<HOOK
#!/bin/sh
$MARK
echo "travel-light is on: the index holds the deletion of reports/ and results/; run scripts/travel_light.sh off" >&2
exit 1
HOOK
    chmod +x "$HOOK"
    echo "travel-light on: ${PATHS[*]} stay on disk and no longer travel; run 'scripts/travel_light.sh off' after the call"
    ;;
  off)
    if ! is_on; then echo "travel-light is already off"; exit 0; fi
    # drop the mark and the two lines after it, nothing else of the user's excludes
    awk -v mark="$MARK" '$0 == mark {skip = 3} skip > 0 {skip--; next} {print}' "$EXCLUDE" > "$EXCLUDE.tmp"
    mv "$EXCLUDE.tmp" "$EXCLUDE"
    if [[ -f $HOOK ]] && grep -qxF "$MARK" "$HOOK"; then rm -f "$HOOK"; fi
    git reset -q -- "${PATHS[@]}"
    for path in "${PATHS[@]}"; do
      if [[ -z $(git ls-files -- "$path" | head -1) ]]; then
        echo "travel_light: warning: HEAD tracks nothing under $path/ (was its deletion committed meanwhile?)" >&2
      fi
    done
    echo "travel-light off: ${PATHS[*]} are tracked as HEAD has them"
    ;;
  status)
    if is_on; then echo "on"; else echo "off"; fi
    ;;
  *)
    echo "usage: scripts/travel_light.sh on|off|status" >&2; exit 2
    ;;
esac
