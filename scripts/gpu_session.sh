#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool): everything a short slot should do, in order, with every
# result written under $OUT as it comes and packed into ONE archive at the end (only 8 files come back).
#
#   bash scripts/gpu_session.sh first    # peers + smoke on CUDA + gpu-headline (ours, torch, Liger, CCE, compile),
#                                        # then, with time left, the conformance matrix on CUDA and the options suite
#   bash scripts/gpu_session.sh second   # QuACK's cells of gpu-headline and its conformance (carry the quack wheels)
#   DEADLINE_S=540 bash scripts/gpu_session.sh first  # seconds after which the headline is stopped and packed
# Device call, with the commit this tree is (the device's copy has no .git; env.json records it):
#   run(command="CEBENCH_GIT_COMMIT=<git rev-parse HEAD> bash scripts/gpu_session.sh first", carry=[".whl"],
#       timeout_s=600)
# First call: install, smoke on CUDA, scripts/tune_triton_fused.py (every launch config of our logits kernel
# against the measured bandwidths, ~1 min; the best is exported as CEBENCH_TRITON_FUSED_CONFIG for the
# headline), then the headline until the deadline.
#
# Prepare here: scripts/wheelhouse.sh .whl first; carry [".whl"]. For the second call rebuild it with only
# QuACK's wheels (rm -r .whl; scripts/wheelhouse.sh .whl quack: ~59 MiB) and leave the committed reports and
# results behind, or the tree is over the 64 MiB a call carries: scripts/travel_light.sh on before the call,
# scripts/travel_light.sh off right after it (13 MB of tree with them on 2026-12-02, 1.1 MB without).
# The run directories come back inside results.tar.xz (runs/<run id>, logs/); land them with
# `python scripts/land_gpu_run.py results.tar.xz` (results/<run id>/, its report, the cells left undone). A headline
# cut off by the budget is finished later with `python -m cebench run --resume results/<run id>` (rows are written as
# they are measured, nothing is lost).
set -uo pipefail
STAGE=${1:-first}
OUT=${OUT:-/tmp/cebench-out}  # what comes back: results.tar.xz and session.log only (8 files at most)
W=${W:-/tmp/cebench-work}      # runs and logs are written here as they come, then packed into $OUT
DEADLINE_S=${DEADLINE_S:-560}  # the headline gets what is left of this after install, smoke and tuning (timeout_s=600:
                               # 40 s left to stop it and pack)
SITE=${SITE:-/tmp/site}
rm -rf "$W"  # a machine still warm from a first call must not pack that call's runs and parts again
mkdir -p "$OUT" "$W/runs" "$W/logs" "$W/conformance"
export PYTHONUNBUFFERED=1
# torch.cuda.is_available() through NVML, which does not initialise CUDA: a check made before the workers
# fork can then not poison them ("Cannot re-initialize CUDA in forked subprocess")
export PYTORCH_NVML_BASED_CUDA_CHECK=1
log() { echo "[$(date +%T)] $*" | tee -a "$W/logs/session.log"; }
# also during the run: a call cut off still brings back what it had. tar exits 1 when a file grew while it was
# read (results.csv, the logs: always, mid-run); that archive is still whole, so only rc > 1 keeps the old one
pack() { tar cJf "$OUT/results.tar.xz.tmp" -C "$W" runs logs conformance; (( $? <= 1 )) && mv "$OUT/results.tar.xz.tmp" "$OUT/results.tar.xz"
         cp "$W/logs/session.log" "$OUT/"; }

log "install carried wheels"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
  >> "$W/logs/install.log" 2>&1 || log "pip install failed (see install.log)"
[ -f .whl/cutlass-libs-cu13.tar.xz ] && tar xJf .whl/cutlass-libs-cu13.tar.xz -C "$SITE"
export PYTHONPATH="$PWD:$SITE"  # cebench runs from the checkout; torch and the rest come with the image
{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } \
  > "$W/logs/machine.txt" 2>&1
python3 -m cebench list > "$W/logs/list.txt" 2>&1

if [[ $STAGE == first ]]; then
  log "smoke on CUDA"
  # every implementation but the two whose compiles take most of the smoke's time (torch.compile, CCE's compiled
  # baseline): the headline meets them anyway, and a failure there is a row, not a lost slot
  SMOKE_IMPLS=triton_fused,triton_fused_linear,torch,linear_torch,liger,liger_linear,cce,chunked,linear_chunked
  SMOKE_IMPLS=$SMOKE_IMPLS,naive_softmax,manual_logsoftmax,torch_linear
  timeout 150 python3 -m cebench run --suite smoke --device cuda --impl "$SMOKE_IMPLS" --out "$W/runs" --no-report \
    > "$W/logs/smoke.log" 2>&1; log "smoke exit $?"; pack
  log "tune triton_fused's launch config"
  timeout 100 python3 scripts/tune_triton_fused.py --deadline-s 60 --json "$W/logs/tune.json" > "$W/logs/tune.log" 2>&1
  RC=$?; BEST=$(sed -n 's/^best: //p' "$W/logs/tune.log" | tail -1)  # the choice so far is printed after each config
  if [[ -n $BEST && $BEST != None ]]; then export CEBENCH_TRITON_FUSED_CONFIG=$BEST; fi
  BEST=$(sed -n 's/^best eval: //p' "$W/logs/tune.log" | tail -1)  # the loss-only launch's, per V
  if [[ -n $BEST && $BEST != None ]]; then export CEBENCH_TRITON_FUSED_EVAL_CONFIG=$BEST; fi
  log "tuning exit $RC, config ${CEBENCH_TRITON_FUSED_CONFIG:-default}, eval ${CEBENCH_TRITON_FUSED_EVAL_CONFIG:-same}"
  pack
  # in this order: an isolated run goes implementation by implementation, and torch.compile's compile time per
  # shape is the estimate's biggest guess, so it comes after Liger and CCE, which a long compile cannot then crowd out
  IMPLS=triton_fused,triton_fused_linear,torch,linear_torch,liger,liger_linear,cce,torch_compile,torch_linear,chunked
  IMPLS=$IMPLS,linear_chunked,cce_torch_compile
else
  IMPLS=quack,quack_linear
fi

BUDGET_S=$((DEADLINE_S - SECONDS)); (( BUDGET_S < 60 )) && BUDGET_S=60
log "gpu-headline ($IMPLS), budget ${BUDGET_S}s"
# a process group of its own (setsid), so that stopping it stops its forkserver and workers too: they would
# otherwise go on computing, and writing logs while the archive is made
setsid python3 -m cebench run --suite gpu-headline --device cuda --impl "$IMPLS" --out "$W/runs" --no-report \
  > "$W/logs/headline.log" 2>&1 &
PID=$!
for ((i = 0; i < BUDGET_S; i += 5)); do
  kill -0 $PID 2>/dev/null || break; sleep 5; (( i % 60 == 55 )) && pack
done
if kill -0 $PID 2>/dev/null; then
  log "budget spent: stopping the headline (resume it later)"; kill -TERM -- -$PID; sleep 5; kill -KILL -- -$PID 2>/dev/null
fi
wait $PID 2>/dev/null; log "headline exit $?"
# the tuning table travels with the run it chose the config for (committed with results/<run>/)
for d in "$W"/runs/*-gpu-headline-*/; do [ -f "$W/logs/tune.json" ] && cp "$W/logs/tune.json" "$d"; done
pack  # the headline whole, before anything else is tried

# time left after the headline: the conformance matrix on CUDA (edge cases and options at their extremes), one
# implementation per process, so that the deadline loses only the one in flight; land_gpu_run.py joins the parts into
# reports/conformance/<time>-cuda/, the table a report needs before its verdicts may name an implementation. Ours
# first, then the CUDA-only peer (no CPU table has it) and the rest; the compiled ones last (a compile per scenario)
conform() {
  local impl
  for impl in ${1//,/ }; do
    LEFT_S=$((DEADLINE_S - SECONDS - 15)); (( LEFT_S >= 30 )) || break
    log "conformance $impl (${LEFT_S}s left)"
    timeout -k 5 "$LEFT_S" python3 -m cebench conformance --device cuda --impl "$impl" --out "$W/conformance/$impl" \
      > "$W/logs/conformance-$impl.log" 2>&1; log "conformance $impl exit $?"
  done
  pack
}
if [[ $STAGE == first ]]; then
  conform triton_fused,triton_fused_linear,cce,liger,liger_linear,torch,linear_torch,chunked,linear_chunked,torch_linear
  conform torch_compile,cce_torch_compile
else
  conform quack,quack_linear
fi

# and then the options suite (label smoothing, z-loss, softcap at ordinary values, timed) on the peers' CUDA paths, which
# nothing else checks on a GPU (~1 min modelled); stopped in time to pack (timeout signals its whole process group:
# the forkserver and workers too)
LEFT_S=$((DEADLINE_S - SECONDS - 15))
if [[ $STAGE == first ]] && (( LEFT_S >= 60 )); then
  log "options (${LEFT_S}s left)"
  OPTION_IMPLS=${SMOKE_IMPLS/naive_softmax,/}
  timeout -k 5 "$LEFT_S" python3 -m cebench run --suite options --device cuda --impl "$OPTION_IMPLS" \
    --out "$W/runs" --no-report > "$W/logs/options.log" 2>&1; log "options exit $?"
fi

log "pack"; pack
ls -la "$OUT"
