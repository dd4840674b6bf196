"""Print the mutation score per module from mutmut's results (run from the repository root after `mutmut run`).

    pip install -e ".[mutation]"
    mutmut run "cebench.compare.*"          # a module at a time on a small machine
    python tests/mutation_score.py          # killed / checked, per module and in total
    mutmut results                          # the survivors, by name; `mutmut show NAME` for one

A mutant counts as killed when a test failed, timed out or crashed on it; the rest of the checked
ones (survived, no test reached it) are not. Equivalent survivors are listed in tests/MUTANTS.md.
Not a test file: pytest does not collect it, and CI does not run mutmut (too slow there).
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

from mutmut.stats import status_by_exit_code

KILLED = ("killed", "timeout", "segfault", "caught by type check")


def scores(mutants_dir: Path) -> dict[str, collections.Counter]:
    """module -> Counter of mutmut statuses, from the .meta files mutmut leaves next to each mutated module."""
    by_module = {}
    for meta in sorted(mutants_dir.glob("cebench/*.py.meta")):
        exit_codes = json.loads(meta.read_text())["exit_code_by_key"].values()
        counts = collections.Counter(status_by_exit_code[code] for code in exit_codes)
        if counts:
            by_module[meta.name.removesuffix(".py.meta")] = counts
    return by_module


def line(name: str, counts: collections.Counter) -> str:
    checked = sum(n for status, n in counts.items() if status != "not checked")
    killed = sum(counts[s] for s in KILLED)
    percent = f"{100 * killed / checked:5.1f} %" if checked else "    —  "
    rest = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()) if status not in KILLED)
    return f"{name:10s} {killed:5d} / {checked:5d} killed  {percent}   {rest}"


def main(argv: list[str]) -> int:
    mutants_dir = Path(argv[0]) if argv else Path("mutants")
    by_module = scores(mutants_dir)
    if not by_module:
        print(f"no mutmut results under {mutants_dir}/cebench: run `mutmut run` first", file=sys.stderr)
        return 1
    total = collections.Counter()
    for name, counts in by_module.items():
        total.update(counts)
        print(line(name, counts))
    print(line("total", total))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
