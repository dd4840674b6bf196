"""Reports of a run: reports/<run-id>/report.md, report.html and figures, and reports/index.html.

Everything shown is read back from the run's results.csv and env.json, so every figure traces to
a row. The content is computed in cebench/report/data.py (tables), accuracy.py, verdicts.py and
trust.py (who may be recommended), the figures in plots.py, all in this sub-package;
this module only decides where the files go and writes them.
"""

from __future__ import annotations

from pathlib import Path

from cebench import probe
from cebench.report import data as report_data
from cebench.report import plots, plots_tp
from cebench.report import trust as report_trust
from cebench.report.headline import headline_markdown
from cebench.report.html import html, write_index, write_summary
from cebench.report.md import markdown

REPO = Path(__file__).resolve().parent.parent.parent
REPORTS_DIR = REPO / "reports"
RESULTS_DIR = REPO / "results"
FIGURES = "figures"
HEADLINE = "headline.md"  # the block a README's results section is made of (cebench/report/headline.py)


def default_reports_dir(run_dir: str | Path) -> Path:
    """reports/ of the repository for runs kept in results/; elsewhere a reports/ beside the run directory.

    So a run written to a temporary --out directory never leaves files in the repository.
    """
    run_dir = Path(run_dir).resolve()
    return REPORTS_DIR if run_dir.parent == RESULTS_DIR.resolve() else run_dir.parent / "reports"


def conformance_dirs(reports_dir: Path) -> list[Path]:
    """Where stored conformance tables are looked for: beside the reports, then the repository's."""
    return list(dict.fromkeys([Path(reports_dir) / "conformance", report_trust.CONFORMANCE_DIR]))


def write_reports(run_dir: str | Path, reports_dir: str | Path | None = None,
                  conformance: list | None = None) -> dict[str, Path]:
    """Write the Markdown and HTML reports of `run_dir` and refresh the index; the paths written.

    `conformance`: folders holding stored conformance tables (default: conformance_dirs)."""
    reports_dir = Path(reports_dir) if reports_dir else default_reports_dir(run_dir)
    run = report_data.load(run_dir, conformance if conformance is not None else conformance_dirs(reports_dir))
    out_dir = reports_dir / run.run_id
    figure_dir = out_dir / FIGURES
    figure_dir.mkdir(parents=True, exist_ok=True)
    for stale in figure_dir.glob("*.png"):
        stale.unlink()
    roof = probe.roofline(run.env)
    figures = {family: plots.family_figures(run.frame, family, roof) for family in run.families}
    for family in figures:
        if family.startswith("vocab_parallel"):  # time and per-rank memory against world size
            figures[family] += plots_tp.tp_figures(run.frame, only=family)
    for fig in (f for family in figures.values() for f in family):
        (figure_dir / f"{fig.id}.png").write_bytes(fig.png)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text(markdown(run, figures, FIGURES))
    html_path.write_text(html(run, figures))
    (out_dir / HEADLINE).write_text(headline_markdown(run))
    write_summary(run, out_dir)
    return {"markdown": md_path, "html": html_path, "headline": out_dir / HEADLINE, "index": write_index(reports_dir)}


def write_markdown(run_dir: str | Path, reports_dir: Path | None = None) -> Path:
    """Kept for callers of the first version: writes every report, returns the Markdown path."""
    return write_reports(run_dir, reports_dir)["markdown"]
