#!/usr/bin/env bash
# The CUDA run, in one go, on a machine with an NVIDIA GPU (no network needed):
#
#   bash benchmarks/cuda.sh [RESULTS_DIR]        # default RESULTS_DIR: benchmarks/results
#
# 1. Stops at once, exit 3, with a message, when torch sees no CUDA GPU.
# 2. Uses the python3 on PATH (override with PYTHON=...) and its torch; grokopt is taken from
#    this checkout through PYTHONPATH (nothing is installed). The peers benchmarked against
#    (pytorch_optimizer, grokfast-pytorch) are installed from wheels in .whl/ into a scratch
#    folder when they are missing (no index is contacted).
# 3. Runs the CUDA tests (`-m cuda`: every test marked cuda), the whole test suite under this torch, and every
#    benchmark on the GPU, each under a time limit; the limits add up to 8 minutes, the
#    whole suite runs only in what is left of them (the script has not yet run on a GPU).
# 4. Writes into RESULTS_DIR: grokfast-cuda.json, peers-cuda.json, orthograd-cuda.json
#    (pytest-benchmark, with the GPU's name in machine_info.grokopt), cuda-tests.log,
#    suite-cuda.log and cuda-summary.txt.
# Exit status: 0 when the CUDA tests passed and the three benchmark files were written, else 1.
set -uo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
results="${1:-benchmarks/results}"
py="${PYTHON:-python3}"
mkdir -p "$results"

if ! timeout 60 "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)'; then
    echo "cuda.sh: error: torch ($py) sees no CUDA GPU; run this on a machine with an NVIDIA GPU" >&2
    exit 3
fi

export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if ! "$py" -c 'import pytorch_optimizer, grokfast_pytorch' 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/grokopt-peers .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/grokopt-peers"
fi
"$py" - <<'PY'
import torch
p = torch.cuda.get_device_properties(0)
print(f"cuda.sh: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY

status=0

echo "== CUDA tests"
timeout 120 "$py" -m pytest -p no:cacheprovider -m cuda -rs tests 2>&1 | tee "$results/cuda-tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmarks on the GPU"
timeout 135 "$py" -m pytest -p no:cacheprovider -q benchmarks/test_grokfast_bench.py -k cuda \
    --benchmark-json="$results/grokfast-cuda.json" --benchmark-columns=mean,stddev,rounds 2>&1 | tail -n 40
[ -s "$results/grokfast-cuda.json" ] || status=1
timeout 120 "$py" -m pytest -p no:cacheprovider -q benchmarks/test_peers_bench.py -k "not orthograd" \
    --benchmark-json="$results/peers-cuda.json" --benchmark-columns=mean,stddev,rounds 2>&1 | tail -n 40
[ -s "$results/peers-cuda.json" ] || status=1
timeout 45 "$py" -m pytest -p no:cacheprovider -q benchmarks/test_peers_bench.py -k orthograd \
    --benchmark-json="$results/orthograd-cuda.json" --benchmark-columns=mean,stddev,rounds 2>&1 | tail -n 30
[ -s "$results/orthograd-cuda.json" ] || status=1

echo "== summary"
for f in "$results/grokfast-cuda.json" "$results/peers-cuda.json" "$results/orthograd-cuda.json"; do
    [ -s "$f" ] && "$py" benchmarks/summarize.py "$f"
done 2>&1 | tee "$results/cuda-summary.txt"

echo "== the whole suite under this torch (informative; the CUDA tests above decide the status)"
xdist=$("$py" -c 'import xdist' 2>/dev/null && echo "-n 8")
left=$((480 - SECONDS))
if [ "$left" -gt 20 ]; then
    timeout "$left" "$py" -m pytest -p no:cacheprovider -q $xdist >"$results/suite-cuda.log" 2>&1
    tail -n 3 "$results/suite-cuda.log"
else
    echo "skipped: the 8 minutes are spent" | tee "$results/suite-cuda.log"
fi
exit "$status"
