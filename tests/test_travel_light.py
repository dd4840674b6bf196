"""scripts/travel_light.sh: reports/ and results/ leave git's index for one device call (so they do not travel)
and come back as HEAD has them; the files on disk are never touched, and landing refuses while it is on."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "travel_light.sh"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout


def _light(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/travel_light.sh", *args], cwd=repo, capture_output=True, text=True)


@pytest.fixture
def repo(tmp_path):
    """A checkout with code, committed reports and results, and an exclude line of the user's own."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPT, tmp_path / "scripts" / "travel_light.sh")
    for path, text in {"code.py": "x = 1\n", "reports/run/report.md": "# r\n", "results/run/results.csv": "a\n"}.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-q", "-m", "init")
    (tmp_path / ".git" / "info").mkdir(exist_ok=True)
    (tmp_path / ".git" / "info" / "exclude").write_text("/.whl/\n")
    return tmp_path


def test_on_leaves_them_behind_and_off_brings_them_back(repo):
    assert _light(repo, "status").stdout.strip() == "off"
    assert _light(repo, "on").returncode == 0
    tracked = set(_git(repo, "ls-files").split())
    assert tracked == {"code.py", "scripts/travel_light.sh"}  # what travels: no reports/, no results/
    ignored = _git(repo, "status", "--porcelain", "--ignored")
    assert "!! reports/" in ignored and "!! results/" in ignored
    assert (repo / "reports/run/report.md").read_text() == "# r\n"  # on disk, untouched
    assert _light(repo, "status").stdout.strip() == "on"
    assert "already on" in _light(repo, "on").stdout  # twice: one mark, not two
    assert (repo / ".git/info/exclude").read_text().count("travel-light") == 1

    assert _light(repo, "off").returncode == 0
    assert set(_git(repo, "ls-files").split()) == tracked | {"reports/run/report.md", "results/run/results.csv"}
    assert _git(repo, "status", "--porcelain") == ""  # the index is HEAD's again
    assert (repo / ".git/info/exclude").read_text() == "/.whl/\n"  # the user's own line kept, ours gone
    assert _light(repo, "status").stdout.strip() == "off"


def test_no_commit_while_it_is_on(repo):
    """The index holds the deletion of reports/ and results/ meanwhile: a commit would record it. A hook refuses
    every commit until `off`, which removes the hook and leaves nothing to commit."""
    _light(repo, "on")
    (repo / "code.py").write_text("x = 2\n")
    _git(repo, "add", "code.py")
    refused = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "m"], cwd=repo,
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "travel_light.sh off" in refused.stderr
    assert "reports/run/report.md" in _git(repo, "ls-tree", "-r", "--name-only", "HEAD")
    _git(repo, "reset", "-q", "code.py")
    assert _light(repo, "off").returncode == 0
    assert not (repo / ".git/hooks/pre-commit").exists()
    assert _light(repo, "off").stdout.strip() == "travel-light is already off"


def test_an_exclude_file_without_its_last_newline(repo):
    (repo / ".git/info/exclude").write_text("/.whl/")  # as an editor may leave it
    _light(repo, "on")
    assert _light(repo, "status").stdout.strip() == "on"
    assert "!! reports/" in _git(repo, "status", "--porcelain", "--ignored")
    _light(repo, "off")
    assert (repo / ".git/info/exclude").read_text() == "/.whl/\n"
    assert _git(repo, "status", "--porcelain") == ""


def test_on_refuses_while_something_is_staged(repo):
    (repo / "code.py").write_text("x = 2\n")
    _git(repo, "add", "code.py")
    refused = _light(repo, "on")
    assert refused.returncode == 1 and "staged changes" in refused.stderr
    assert "reports/run/report.md" in _git(repo, "ls-files")
    assert _light(repo, "status").stdout.strip() == "off"


def test_landing_refuses_while_it_is_on(monkeypatch, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("land_gpu_run", ROOT / "scripts" / "land_gpu_run.py")
    land_gpu_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(land_gpu_run)
    assert land_gpu_run.travel_light_on() is False  # this checkout, as committed
    monkeypatch.setattr(land_gpu_run, "travel_light_on", lambda: True)
    assert land_gpu_run.main([str(tmp_path / "results.tar.xz")]) == 2
    assert "travel_light.sh off" in capsys.readouterr().err
