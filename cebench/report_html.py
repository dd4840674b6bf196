"""The HTML report of one run and the index of every run, rendered from jinja2 templates.

One file per run, self-contained: the CSS is inline and every figure is a base64 data: URI, so
the page can be mailed, attached to CI, or opened from disk without any network fetch.
The templates live in cebench/templates/ and are read relative to this file (editable installs
and source checkouts need no package-data set-up).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import jinja2

from cebench import probe
from cebench.report_data import Run, family_tables, problems, provenance, recommendations, verdicts

TEMPLATES = Path(__file__).resolve().parent / "templates"
SUMMARY = "summary.json"  # per report directory: what the index lists


def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def _figure(fig) -> dict:
    return {"id": fig.id, "title": fig.title, "caption": fig.caption, "b64": base64.b64encode(fig.png).decode("ascii"),
            "data": fig.data.to_dict("records")}


def html(run: Run, figures: dict[str, list]) -> str:
    families = [{"name": f, "tables": family_tables(run.frame, f), "figures": [_figure(x) for x in figures.get(f, [])]}
                for f in run.families]
    return _environment().get_template("report.html.j2").render(
        run=run, problems=problems(run.frame), recommendations=recommendations(run.frame),
        verdicts=verdicts(run.frame), provenance=provenance(run.env), families=families,
        roofline=probe.roofline(run.env))


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
