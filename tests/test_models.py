"""Model presets (cebench/models.py) and `run --model` / `list --models`.

The table's figures come from the models' published config.json files; these tests pin the
ones the issue names (Qwen 3's V=151936, Gemma 2's softcap 30), check that every preset
says where its figures come from, and that a preset suite has both families at the requested
token counts. One CPU run at 64 tokens shows `--model` end to end.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cebench import models
from cebench.cases import MODES
from cebench.cli import main
from cebench.results import read_env, read_results
from cebench.suites import SuiteError

REPO = Path(__file__).resolve().parent.parent
ASKED_FOR = ("gpt2", "llama3-8b", "llama3-70b", "llama3.2-1b", "mistral-7b", "mistral-nemo", "qwen2.5-7b", "qwen3-8b",
             "gemma2-2b", "gemma2-9b", "gemma3-1b", "gemma3-4b", "gemma3-12b", "gemma3-27b",
             "deepseek-v3", "phi3-mini", "phi4", "olmo2-7b")


def test_every_preset_has_figures_and_a_source():
    assert set(ASKED_FOR) <= set(models.BY_NAME)
    assert len(models.BY_NAME) == len(models.PRESETS)  # names are unique
    for m in models.PRESETS:
        assert isinstance(m.V, int) and m.V > 0 and isinstance(m.H, int) and m.H > 0, m
        assert m.hf_config.startswith("huggingface.co/") and m.hf_config.endswith("/blob/main/config.json"), m
        assert m.read_in, f"{m.name}: say where the figures were read"


def test_figures_the_issue_names():
    assert models.BY_NAME["qwen3-8b"].V == 151936
    assert [m.name for m in models.PRESETS if m.softcap] == ["gemma2-2b", "gemma2-9b"]
    assert all(m.softcap == 30.0 for m in models.PRESETS if m.softcap)
    assert (models.BY_NAME["gpt2"].V, models.BY_NAME["gpt2"].H) == (50257, 768)


def test_gemma3_heads_are_the_hub_models_not_the_text_cut():
    """Gemma 3 4B/12B/27B's LM head has 262208 rows (262144 text tokens + image tokens, tied to the embedding);
    litgpt and MaxText cut it to 262144, the 1B text-only model's width. No softcap (Gemma 2 had 30)."""
    heads = {n: (models.BY_NAME[n].V, models.BY_NAME[n].H, models.BY_NAME[n].softcap)
             for n in ("gemma3-1b", "gemma3-4b", "gemma3-12b", "gemma3-27b")}
    assert heads == {"gemma3-1b": (262144, 1152, None), "gemma3-4b": (262208, 2560, None),
                     "gemma3-12b": (262208, 3840, None), "gemma3-27b": (262208, 5376, None)}


def test_suite_has_both_families_at_each_token_count():
    suite = models.suite(["qwen3-8b", "llama3-8b", "gemma2-2b"], [8192, 16384])
    assert "qwen3-8b" in suite.name and "llama3-8b" in suite.name and "gemma2-2b" in suite.name
    assert "V=151936, H=4096" in suite.description and "softcap 30" in suite.description
    cases = [c for c, _, _ in suite.cells()]
    got = {(c.family, c.N, c.V, c.H, c.softcap) for c in cases}
    for m in (models.BY_NAME[n] for n in ("qwen3-8b", "llama3-8b", "gemma2-2b")):
        for n in (8192, 16384):
            assert ("logits", n, m.V, None, m.softcap) in got and ("linear", n, m.V, m.H, m.softcap) in got
    assert len(cases) == 3 * 2 * 2 and all(c.dtype == "bfloat16" for c in cases)


def test_a_model_named_twice_runs_once():
    suite = models.suite(["llama3-8b", "llama3-8b"], [64])
    assert len(list(suite.cells())) == 2  # one logits and one linear case, not two of each


def test_suite_hash_changes_with_tokens_and_models():
    a, b = models.suite(["gpt2"], [64]), models.suite(["gpt2"], [128])
    assert a.sha256 != b.sha256 and a.sha256 == models.suite(["gpt2"], [64]).sha256


@pytest.mark.parametrize("names,tokens,match", [
    (["qwen9"], [64], "unknown model"),
    ([], [64], "at least one model"),
    (["gpt2"], [0], "positive integers"),
    (["gpt2"], [], "positive integers"),
])
def test_bad_presets_are_clear_errors(names, tokens, match):
    with pytest.raises(SuiteError, match=match):
        models.suite(names, tokens)


@pytest.mark.parametrize("argv,match", [
    (["run", "--model", "gpt2"], "needs --tokens"),
    (["run", "--tokens", "64"], "goes with --model"),
    (["run", "--model", "gpt2", "--tokens", "64", "--suite", "smoke"], "either --suite or --model"),
    (["run", "--model", "gpt2", "--tokens", "6x"], "positive integers"),
    (["run", "--model", "qwen9", "--tokens", "64"], "unknown model"),
])
def test_cli_usage_errors_exit_2(argv, match, capsys):
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_list_models_prints_the_table(capsys):
    assert main(["list", "--models"]) == 0
    out = capsys.readouterr().out
    for m in models.PRESETS:
        assert f"| {m.name} | {m.V} | {m.H} |" in out and m.hf_config in out


def test_run_model_on_cpu_at_64_tokens(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cebench", "run", "--model", "gpt2", "--tokens", "64",
                           "--impl", "chunked,linear_chunked", "--out", str(tmp_path), "--no-report"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    rows = read_results(run_dir)
    checks = rows[rows.metric == "agreement"]
    assert {(r.impl, r.N, r.V, None if r.H != r.H else r.H) for r in checks.itertuples()} == {
        ("chunked", 64, 50257, None), ("linear_chunked", 64, 50257, 768)}
    # ran and compared with the float64 reference (whether bf16 passes is the accuracy rules' business)
    assert checks.reason.str.match(r"agrees|DISAGREES").all(), checks.reason.tolist()
    times = rows[rows.metric == "time"]
    assert len(times) == 2 * len(MODES) and (times.value > 0).all(), times[["impl", "mode", "status", "reason"]]
    env = read_env(run_dir)
    assert env["suite"] == "models-gpt2" and env["models"] == {"V=50257 H=768": "gpt2"}
    assert env["run_args"]["model"] == "gpt2" and env["run_args"]["tokens"] == "64"
    json.dumps(env)  # still plain JSON
