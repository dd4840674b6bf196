"""Time every launch config of our logits kernel on this GPU, against its measured ceilings; name the best.

Issue 11.3 holds `triton_fused` to 0.90 of the copy bandwidth (training: read the logits, write the
gradient in place, 2·N·V·b bytes) and 0.90 of the read bandwidth (eval: N·V·b bytes). The kernel's
launch configs (impls/triton_fused.py, CANDIDATE_CONFIGS) trade rows in flight (L2 reuse between the
two passes) against bytes in flight (latency hiding); which wins is a property of the GPU, so it is
measured here, in one go, before the headline run:
  for each config (in CANDIDATE_CONFIGS order, the controls last) × V (N and dtype fixed), the kernel alone
  (fused_ce_rows, as triton_fused calls it), checked first against F.cross_entropy in float32, the loss and
  the gradient it writes (a config that computes anything else is out), then timed with
  triton.testing.do_bench (L2 flushed before every call, median).
The rows (config and its parameters, V, mode, ms, GB/s, fraction of the ceiling) go to --json. The best
config per V is the fastest in training among those that passed the gate there (a probe that failed
leaves the fractions empty, not the choice); the choice is printed after every config as `best: NAME`
(one config won everywhere) or `best: V:NAME,V:NAME,...`, the value a session script exports as
CEBENCH_TRITON_FUSED_CONFIG for the run that follows (a row takes the entry of the smallest V at or above
its own; env.json records it); `best eval:` the same for the loss-only launch, for
CEBENCH_TRITON_FUSED_EVAL_CONFIG. Past --deadline-s no further config is begun, so a short slot still
names the best of those it measured. CUDA only.

    python scripts/tune_triton_fused.py --json tune.json            # N=8192 bf16, V in 32000 50257 128256 256000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VOCABS = (32000, 50257, 128256, 256000)


def load_kernel():
    from cebench.registry import load_file
    load_file(ROOT / "impls" / "triton_fused.py")
    return sys.modules["cebench_plugin_triton_fused"]


def check(fused, config, logits, targets, rows: int = 512) -> tuple[float, float]:
    """Relative errors of the kernel against F.cross_entropy in float32: the mean loss, and the gradient it
    writes in place (the norm of the difference over the reference's, on the first `rows` rows)."""
    import torch
    import torch.nn.functional as F

    x = logits.clone()
    n = x.shape[0]
    n_valid = torch.tensor(n, device=x.device)
    losses, _ = fused.fused_ce_rows(x, targets, x, n_valid, reduction="mean", ignore_index=-100,
                                    label_smoothing=0.0, z_loss=0.0, softcap=None, config=config)
    want = F.cross_entropy(logits.float(), targets)
    head = logits[:rows].float()
    want_grad = torch.softmax(head, dim=-1)
    want_grad[torch.arange(len(head), device=head.device), targets[:rows]] -= 1.0
    want_grad /= n  # the mean's factor
    grad_err = float((x[:rows].float() - want_grad).norm() / want_grad.norm())
    return abs(float(losses.mean()) - float(want)) / abs(float(want)), grad_err


def time_config(fused, config, logits, targets) -> dict[str, float]:
    """Median ms of the training call (gradient written over the logits) and of the loss-only call."""
    import torch
    from triton.testing import do_bench

    n_valid = torch.tensor(logits.shape[0], device=logits.device)
    opts = {"reduction": "mean", "ignore_index": -100, "label_smoothing": 0.0, "z_loss": 0.0, "softcap": None,
            "config": config}
    # in place: every call overwrites the buffer with a gradient, whose values cost the kernel the same
    train = do_bench(lambda: fused.fused_ce_rows(logits, targets, logits, n_valid, **opts), warmup=25, rep=100,
                     return_mode="median")
    evaluate = do_bench(lambda: fused.fused_ce_rows(logits, targets, None, n_valid, **opts), warmup=25, rep=100,
                        return_mode="median")
    return {"forward+backward": train, "eval": evaluate}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, nargs="+", default=list(VOCABS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # the CPU tests: interpreter, fake timer
    parser.add_argument("--deadline-s", type=float, default=float("inf"),
                        help="begin no further config after this many seconds (the ones begun finish)")
    args = parser.parse_args(argv)
    start = time.perf_counter()  # the deadline counts the probe and the inputs too
    import torch

    from cebench import probe

    fused = load_kernel()
    device = args.device
    roof = probe.run_probe(device)
    rows, inputs = [], {}
    for vocab in args.vocab:  # every V's logits once (3.8 GB at N=8192 over the four V's)
        gen = torch.Generator(device=device).manual_seed(vocab)
        pristine = (torch.randn(args.tokens, vocab, device=device, generator=gen) * 2).to(torch.bfloat16)
        inputs[vocab] = pristine, torch.randint(0, vocab, (args.tokens,), device=device, generator=gen)
    name = torch.cuda.get_device_name() if device == "cuda" else device
    best = None
    # config by config, in CANDIDATE_CONFIGS order (the controls last): past the deadline no config is begun.
    # The choice so far is printed and written after every config, so a run killed by a timeout still names one
    # (the last `best:` line counts).
    for config in fused.CANDIDATE_CONFIGS:
        if time.perf_counter() - start > args.deadline_s:
            print(f"deadline: {config.name} and later configs not measured", flush=True)
            break
        for pristine, targets in inputs.values():
            rows += measure_config(fused, config, pristine, targets, roof)
        if device == "cuda":
            torch.cuda.empty_cache()
        best = report_choice(rows, roof, name, time.perf_counter() - start, args.json)
    return 0 if best else 1


def report_choice(rows: list[dict], roof: dict, device_name: str, seconds: float, json_path: Path | None) -> str | None:
    """Print the choices so far (`best eval:`, then `best:`) and rewrite the JSON; returns the training choice."""
    best, best_eval = config_table(best_configs(rows)), config_table(best_configs(rows, "eval"))
    if json_path:
        json_path.write_text(json.dumps({"probe": roof, "rows": rows, "best": best, "best_eval": best_eval,
                                         "device": device_name, "seconds": round(seconds, 1)}, indent=1))
    print(f"best eval: {best_eval}", flush=True)
    print(f"best: {best}", flush=True)
    return best


def measure_config(fused, config, pristine, targets, roof: dict) -> list[dict]:
    """One config at one V: gated, then timed; a row per mode, or one row with the error."""
    tokens, vocab = pristine.shape
    row = {"config": config.name, "N": tokens, "V": vocab, "dtype": "bfloat16", "block_v": config.block_v,
           "num_warps": config.num_warps, "stages": config.stages, "lane_stats": config.lane_stats}
    try:
        row["rel_err_loss"], row["rel_err_grad"] = check(fused, config, pristine, targets)
        if not (row["rel_err_loss"] < 1e-2 and row["rel_err_grad"] < 1e-2):
            raise ValueError(f"off by {row['rel_err_loss']:.2e} (loss), {row['rel_err_grad']:.2e} (gradient)")
        times = time_config(fused, config, pristine.clone(), targets)
    except Exception as exc:  # noqa: BLE001 - a config that fails is reported, not fatal
        print(f"{config.name:11} V={vocab:6}  failed: {exc}"[:300], flush=True)
        return [{**row, "error": f"{type(exc).__name__}: {exc}"[:300]}]
    rows = []
    for mode, ms in times.items():
        moved = tokens * vocab * 2 * (2 if mode == "forward+backward" else 1)
        gbps = moved / (ms * 1e-3) / 1e9
        top = roof.get("copy_bandwidth_gbps" if mode == "forward+backward" else "read_bandwidth_gbps")
        rows.append({**row, "mode": mode, "ms": ms, "gbps": gbps, "fraction": gbps / top if top else None})
        print(f"{config.name:11} V={vocab:6} {mode:16} {ms:8.3f} ms {gbps:7.0f} GB/s "
              f"{rows[-1]['fraction'] or float('nan'):.2f} of the {'copy' if 'backward' in mode else 'read'} "
              f"bandwidth", flush=True)
    return rows


def best_configs(rows: list[dict], mode: str = "forward+backward") -> dict[int, str]:
    """Per V, the fastest config in `mode` (the highest fraction of the ceiling, the same ranking at one V, but
    not needing the probe) among those that passed the gate there."""
    best: dict[int, tuple[float, str]] = {}
    for r in rows:
        if r.get("mode") == mode and r.get("ms"):
            if r["V"] not in best or r["ms"] < best[r["V"]][0]:
                best[r["V"]] = (r["ms"], r["config"])
    return {vocab: name for vocab, (_, name) in sorted(best.items())}


def config_table(best: dict[int, str]) -> str | None:
    """The value of CEBENCH_TRITON_FUSED_CONFIG for these choices: one name if one config won everywhere."""
    if not best:
        return None
    if len(set(best.values())) == 1:
        return next(iter(best.values()))
    return ",".join(f"{vocab}:{name}" for vocab, name in best.items())


if __name__ == "__main__":
    sys.exit(main())
