"""The launch-config tuning of our logits kernel on the run's GPU, when the run directory holds it.

scripts/gpu_session.sh runs scripts/tune_triton_fused.py before the headline and copies its tune.json
into the headline's run directory. Its rows are `triton_fused`'s kernel alone, at N=8192 and bf16 over
four vocabularies, one launch config at a time (impls/triton_fused.py, CANDIDATE_CONFIGS), as fractions
of the probe's bandwidths: the copy bandwidth in training (the logits read, the gradient written in
place, 2·N·V·2 bytes) and the read bandwidth in evaluation (N·V·2 bytes). Issue 11.3 asks for 0.90 of
each. This table sets every config beside the others, marks the one the headline ran with at each V
(the tuner's choice, which the run's env.json records under cebench_env) and the cells below 0.90,
and keeps a config that failed the tuner's correctness gate as the failure it was.
"""

from __future__ import annotations

import json
from pathlib import Path

from cebench.report.data import Cell, Table

TUNE_FILE = "tune.json"
TARGET = 0.90  # issue 11.3: of the copy bandwidth in training, of the read bandwidth in evaluation
MODES = (("forward+backward", "best", "train"), ("eval", "best_eval", "eval"))


def choices(spec: str | None, vocabs: list[int]) -> dict[int, str]:
    """The config per V that a CEBENCH_TRITON_FUSED_CONFIG value names: one name for every V, or V:NAME pairs."""
    if not spec:
        return {}
    if ":" not in spec:
        return dict.fromkeys(vocabs, spec)
    return {int(v): name for v, _, name in (entry.partition(":") for entry in spec.split(","))}


def tuning_table(run_dir: str | Path | None) -> Table | None:
    """Every config × V × mode of the run's tune.json; None when the run has none."""
    path = Path(run_dir) / TUNE_FILE if run_dir is not None else None
    if path is None or not path.is_file():
        return None
    tune = json.loads(path.read_text())
    rows = tune.get("rows", [])
    vocabs = sorted({r["V"] for r in rows})
    chosen = {mode: choices(tune.get(key) or (tune.get("best") if mode == "eval" else None), vocabs)
              for mode, key, _ in MODES}
    notes, body = [], []
    for name in dict.fromkeys(r["config"] for r in rows):
        mine = [r for r in rows if r["config"] == name]
        first = mine[0]
        launch = (f"{first.get('block_v', '?')} columns × {first.get('num_warps', '?')} warps, "
                  f"{first.get('stages', '?')} stage(s), {'lane' if first.get('lane_stats', True) else 'block'} "
                  f"statistics")
        cells = [Cell(name), Cell(launch)]
        for vocab in vocabs:
            for mode, _, _ in MODES:
                cells.append(_cell(mine, vocab, mode, chosen[mode].get(vocab) == name, notes))
        body.append(cells)
    columns = ["config", "launch", *[f"V={v} {label}" for v in vocabs for _, _, label in MODES]]
    return Table(f"Launch configs of `triton_fused` on this GPU (scripts/tune_triton_fused.py, N={rows[0]['N']}, "
                 "bf16)" if rows else "Launch configs of `triton_fused` on this GPU", columns, body, notes,
                 f"Each cell: the fraction of the probe's copy (train) or read (eval) bandwidth, and the median. "
                 f"✓ marks the config the headline ran with at that V; ↓ a fraction below the {TARGET:.2f} that issue "
                 f"11.3 asks for. Device: {tune.get('device', '?')}; the tuning took {tune.get('seconds', '?')} s.")


def _cell(rows: list[dict], vocab: int, mode: str, chosen: bool, notes: list[str]) -> Cell:
    failed = next((r for r in rows if r["V"] == vocab and "error" in r), None)
    if failed is not None:
        notes.append(f"{failed['config']} at V={vocab}: {failed['error']}")
        return Cell("failed", "failed", failed["error"], note=len(notes))
    found = next((r for r in rows if r["V"] == vocab and r.get("mode") == mode), None)
    if found is None:
        return Cell("—", "absent")
    fraction = found.get("fraction")
    text = f"{fraction:.2f} ({found['ms']:.3g} ms)" if fraction is not None else f"— ({found['ms']:.3g} ms)"
    if fraction is not None and fraction < TARGET:
        text += " ↓"
    return Cell(text + (" ✓" if chosen else ""))
