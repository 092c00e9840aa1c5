#!/usr/bin/env bash
# The GPU check in one command, from any folder:
#     bash benchmarks/gpu_check.sh [OUT_DIR] [more options of python -m benchmarks.gpu_check]
# Runs `python3 -m benchmarks.gpu_check --device cuda` from the repo root (nntrain need not be
# installed) under an 8-minute timeout, then packs OUT_DIR (default benchmarks/results/gpu_check)
# into OUT_DIR.tar.gz. The exit status is the check's: 0 when every stage ran, 124 when timed out.
# PYTHON=... picks the interpreter, DEVICE=cpu a CPU run.
set -u
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/gpu_check}"
shift || true
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout -k 15 480 "${PYTHON:-python3}" -m benchmarks.gpu_check --device "${DEVICE:-cuda}" --out "$out" "$@"
rc=$?
tar -czf "$out.tar.gz" -C "$(dirname "$out")" "$(basename "$out")" || true
echo "gpu_check: exit status $rc; outputs in $out and $out.tar.gz"
exit "$rc"
