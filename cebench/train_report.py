"""train-check's output: a Markdown summary, a figure of the loss curves and their deviations, the raw curves.

summary.md leads with the table (one row per control and implementation: steps trained, largest
|loss - reference loss|, final training loss, reference loss of the final model on held-out text,
weight drift, tolerance, verdict), then how the tolerance was derived and the setup (model, data,
versions). curves.png has two panels: the loss curves, and each run's |loss - reference| per step
on a log axis with the tolerance dashed. curves.json keeps every loss value; env.json the provenance.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

from cebench.train_model import VOCAB, TrainConfig  # noqa: E402

_SHOWN_FLOOR = 1e-9  # identical curves are drawn here on the log axis


def _num(value: float, fmt: str = ".2e") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def table(verdicts) -> list[str]:
    lines = ["| run | family | steps | max \\|Δloss\\| (nats) | final loss | held-out loss | weight drift | "
             "tolerance (Δloss / drift) | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for v in verdicts:
        verdict = f"**{v.verdict}**" if v.verdict == "DRIFTS" or v.verdict.startswith("failed") else v.verdict
        lines.append(f"| `{v.name}` | {v.family} | {v.steps} | {_num(v.max_dev)} | {_num(v.final_loss, '.4f')} | "
                     f"{_num(v.eval_loss, '.4f')} | {_num(v.drift)} | {_num(v.tol_dev)} / {_num(v.tol_drift)} | "
                     f"{verdict} |")
    return lines


def markdown(cfg: TrainConfig, env: dict, ref, verdicts) -> str:
    factor = env["factor"]
    control_rows = [v for v in verdicts if v.family == "control"]
    drifting = [v.name for v in verdicts if v.verdict == "DRIFTS"]
    failed = [v.name for v in verdicts if v.verdict.startswith("failed")]
    lines = [f"# train-check {env['time']} on {env['device_name']} ({env['device']})", ""]
    if drifting or failed:
        lines += [f"**Drifts from the float32 reference:** {', '.join(f'`{n}`' for n in drifting) or 'none'}; "
                  f"**failed:** {', '.join(f'`{n}`' for n in failed) or 'none'}.", ""]
    else:
        lines += ["Every implementation that ran followed the float32 reference within the tolerance.", ""]
    lines += [f"Reference (F.cross_entropy on float32 logits): loss {ref.losses[0]:.4f} → {ref.losses[-1]:.4f} over "
              f"{len(ref.losses)} steps; held-out loss of its final model {ref.eval_loss:.4f}.", ""]
    lines += table(verdicts)
    lines += ["", "## How to read it", "",
              "- **max |Δloss|**: the largest difference between the run's training loss and the reference's, over "
              "the steps it trained (Triton implementations under the interpreter train fewer steps and are compared "
              "over those).",
              "- **weight drift**: |w − w_ref| / |w_ref − w_0| after those steps: the share of the reference's "
              "weight update that came out different.",
              f"- **tolerance**: {factor:g} × the noise floor, the largest deviation of the control runs (as correct as "
              "the reference, rounded differently: the reference again, the head's matmul with its hidden dimension "
              f"permuted, the loss in float64; in {cfg.dtype} when the loss's inputs are), never below one float32 "
              "ulp of the loss. Controls are shown against the floor they set.",
              "- **held-out loss**: the reference loss of the run's final model on held-out text.", ""]
    if control_rows:
        worst = max(control_rows, key=lambda v: (v.steps, v.tol_dev))
        lines += [f"Noise floor at {worst.steps} steps: {worst.tol_dev / factor:.2e} nats, drift "
                  f"{worst.tol_drift / factor:.2e}.", ""]
    failures = [v for v in verdicts if v.verdict.startswith(("failed", "skipped", "unsupported"))]
    if failures:
        lines += ["## Not trained", ""] + [f"- `{v.name}`: {v.verdict}" for v in failures] + [""]
    lines += ["## Setup", "",
              f"- model: {cfg.layers} pre-norm transformer blocks, dim {cfg.model_dim}, {cfg.heads} heads, "
              f"context {cfg.seq}, vocabulary {VOCAB} (bytes), output layer without bias",
              f"- training: {cfg.steps} steps of SGD (lr {cfg.lr:g}, momentum {cfg.momentum:g}), {cfg.batch} × "
              f"{cfg.seq} = {cfg.tokens} tokens per step, seed {cfg.seed}; loss inputs in {cfg.dtype}, "
              f"model in float32; device {cfg.device}",
              f"- data: the first {cfg.corpus_bytes} bytes of the Python {env['python']} standard library's top-level "
              f"modules in name order ({len(env['corpus_files'])} files, {env['corpus_files'][0]} … "
              f"{env['corpus_files'][-1]}; sha256 {env['corpus_sha256'][:16]}…), the last tenth held out",
              f"- torch {env['torch']}, triton {env.get('triton')}, liger-kernel {env.get('liger_kernel')}, "
              f"cut-cross-entropy {env.get('cut_cross_entropy')}; commit {env.get('git_commit')}"
              f"{' (dirty)' if env.get('git_dirty') else ''}; Triton interpreter: {env.get('triton_interpret')}",
              "", "![loss curves and their deviation from the reference](curves.png)", ""]
    return "\n".join(lines)


def _running_max(values: list[float]) -> list[float]:
    out, top = [], 0.0
    for value in values:
        top = max(top, value) if math.isfinite(value) else math.inf
        out.append(max(top, _SHOWN_FLOOR))
    return out


def figure(path: Path, ref, runs, verdicts) -> None:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), dpi=90, sharex=True)
    top.plot(range(1, len(ref.losses) + 1), ref.losses, color="black", linewidth=3, label="reference (fp32)")
    palette = plt.get_cmap("tab20").colors  # more implementations than the default cycle has colours
    for index, run in enumerate(runs):
        if run.status != "ok" or not run.losses:
            continue
        style = {"linestyle": ":", "color": "grey"} if run.family == "control" else {"color": palette[index % 20]}
        xs = range(1, len(run.losses) + 1)
        top.plot(xs, run.losses, linewidth=1, label=run.name, **style)
        devs = [abs(a - b) for a, b in zip(run.losses, ref.losses, strict=False)]
        bottom.plot(xs, _running_max(devs), linewidth=1.2, label=run.name, **style)
    full = [v.tol_dev for v in verdicts if v.family == "control" and v.steps == len(ref.losses)]
    if full:
        bottom.axhline(max(full), color="red", linestyle="--", label=f"tolerance ({len(ref.losses)} steps)")
    top.set_ylabel("training loss (nats)")
    top.set_title("Training loss: the same model, data and seed, each implementation as the loss")
    bottom.set_yscale("log")
    bottom.set_ylabel("max |loss − reference| so far")
    bottom.set_xlabel("step")
    bottom.set_title(f"Deviation from the reference (identical so far: drawn at {_SHOWN_FLOOR:g})")
    bottom.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def write(out: Path, cfg: TrainConfig, env: dict, ref, controls, runs, verdicts) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "env.json").write_text(json.dumps(env, indent=2, default=str) + "\n")
    curves = {"reference": ref.losses, **{r.name: r.losses for r in [*controls, *runs]}}
    (out / "curves.json").write_text(json.dumps({"curves": curves, "verdicts": [vars(v) for v in verdicts]},
                                                indent=1, default=str) + "\n")
    figure(out / "curves.png", ref, [*controls, *runs], verdicts)
    summary = out / "summary.md"
    summary.write_text(markdown(cfg, env, ref, verdicts))
    return summary
