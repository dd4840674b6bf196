"""The HTML report of one run and the index of every run, rendered from jinja2 templates.

One file per run, self-contained: the CSS is inline and every figure is a base64 data: URI, so
the page can be mailed, attached to CI, or opened from disk without any network fetch.
The templates live in cebench/report/templates/ and are read relative to this file (editable installs
and source checkouts need no package-data set-up).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import jinja2

from cebench import probe
from cebench.report import trust as report_trust
from cebench.report.data import MODE_LABEL, Run, family_tables, fwd_grad_impls, label_of, problems, provenance, upstream_note
from cebench.report.verdicts import exclusions, recommendations, unchecked, verdicts

TEMPLATES = Path(__file__).resolve().parent / "templates"
SUMMARY = "summary.json"  # per report directory: what the index lists


def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _figure(fig, labels: dict) -> dict:
    """A figure for the page; the rows it was drawn from name their cases as the tables do."""
    data = [{**d, "case": labels.get(d["case"], d["case"])} for d in fig.data.to_dict("records")]
    return {"id": fig.id, "title": fig.title, "caption": fig.caption, "b64": base64.b64encode(fig.png).decode("ascii"),
            "data": data}


def html(run: Run, figures: dict[str, list]) -> str:
    trust, labels = run.trust, label_of(run.frame)
    families = [{"name": f, "tables": family_tables(run.frame, f, trust, probe.roofline(run.env), run.run_dir),
                 "figures": [_figure(x, labels) for x in figures.get(f, [])]} for f in run.families]
    recs = recommendations(run.frame, trust)
    return _environment().get_template("report.html.j2").render(
        run=run, problems=problems(run.frame), recommendations=recs, verdicts=verdicts(run.frame, trust),
        provenance=provenance(run.env), families=families, roofline=probe.roofline(run.env), trust=trust,
        exclusions=exclusions(run.frame, trust), unchecked=unchecked(run.frame, trust),
        upstream=upstream_note(run.frame).replace("`", ""), fwd_grad=fwd_grad_impls(run.frame),
        noise_spread=report_trust.NOISE_SPREAD, mode_label=MODE_LABEL,
        show_dist=len({r["distribution"] for r in recs}) > 1 or any(r["distribution"] not in ("", "gaussian")
                                                                    for r in recs),
        show_models=any(r["models"] for r in recs), show_eval=any(r["eval"] is not None for r in recs))


def summary(run: Run) -> dict:
    """The facts the index shows for this run, kept beside its report."""
    env = run.env
    return {"run_id": run.run_id, "time": env.get("time"), "device": env.get("device"),
            "device_name": env.get("device_name"), "suite": env.get("suite"),
            "impls": run.frame["impl"].nunique(), "problems": len(problems(run.frame))}


def write_index(reports_dir: Path) -> Path:
    """reports/index.html: every report directory that has a summary, newest first."""
    reports_dir = Path(reports_dir)
    runs = []
    for path in sorted(reports_dir.glob(f"*/{SUMMARY}")):
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue  # a half-written or foreign directory is not worth failing the index for
    runs.sort(key=lambda r: (str(r.get("time")), r.get("run_id", "")), reverse=True)
    out = reports_dir / "index.html"
    out.write_text(_environment().get_template("index.html.j2").render(runs=runs))
    return out


def write_summary(run: Run, out_dir: Path) -> Path:
    path = Path(out_dir) / SUMMARY
    path.write_text(json.dumps(summary(run), indent=2) + "\n")
    return path
