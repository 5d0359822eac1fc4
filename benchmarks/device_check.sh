#!/usr/bin/env bash
# One prepared GPU session: install weightdiff offline, run the kernel parity and throughput check,
# then compare the same generated pairs with --device cuda and --device cpu and check that the
# two JSON results agree (CPU and GPU sum in different orders: rtol 1e-9 on stats, 1e-3 on spectra).
#
#   bash benchmarks/device_check.sh            # on a CUDA machine with torch, numba, safetensors
#   SKIP_INSTALL=1 DEVICE=cpu SIZES=tiny PY=.venv/bin/python bash benchmarks/device_check.sh  # CPU smoke test
#
# On CUDA it also generates a Mistral-7B-shaped bf16 pair on the device (benchmarks/gen_pair_torch.py,
# ~29 GB on local disk, every layer matrix changed by a dense 1e-2 update) and times a whole
# `compare --device cuda` on it, cold (page cache dropped when root) and warm, with every rank from
# the full Gram spectrum (benchmarks/bench_7b.py: wall, peak RSS, bytes read, exact ranks); the pair is
# deleted afterwards (after the CUDA-vs-CPU check). SKIP_7B=1 leaves it out; RUNS_7B=warm, T_GEN and T_7B
# (seconds) fit it into a short lease. Then the same for a 70B-width slice (two Llama-2-70B layers,
# make_pair.py's 70b-slice): SKIP_70B, RUNS_70B, T_70B.
# Results go to $OUT (or ./device-out): gpu_check.txt, compare_<size>_<device>.json, bench_7b_cuda.json,
# summary.txt.
set -u
OUT=${OUT:-device-out}
DEVICE=${DEVICE:-cuda}
SIZES=${SIZES:-"100m 1b"}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }

log "host: $(nproc) cores; $($PY -c 'import torch;print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no cuda")' 2>&1)"
if [ -z "${SKIP_INSTALL:-}" ]; then
  $PY -m pip install -q --no-deps --no-build-isolation --no-index . >"$OUT/install.txt" 2>&1 \
    || { log "install failed"; tail -5 "$OUT/install.txt"; exit 1; }
fi

if [ "$DEVICE" = cuda ] && [ -z "${SKIP_GPU_CHECK:-}" ]; then
  log "kernel parity and stats-pass throughput (benchmarks/gpu_check.py)"
  timeout 240 $PY benchmarks/gpu_check.py 2>&1 | tee "$OUT/gpu_check.txt"
  log "gpu_check exit: ${PIPESTATUS[0]}"
fi

for size in $SIZES; do
  pair=/tmp/wd-pair-$size
  log "generate $size pair"
  ( time $PY benchmarks/make_pair.py --size "$size" "$pair" >/dev/null ) 2>&1 | grep real | tee -a "$OUT/summary.txt"
  for dev in "$DEVICE" cpu; do
    [ "$dev" = cpu ] && [ "$DEVICE" = cpu ] && [ -f "$OUT/compare_${size}_cpu.json" ] && continue
    log "compare $size --device $dev (rank on)"
    ( time timeout 300 weightdiff compare "$pair/base" "$pair/tuned" --device "$dev" -q \
        --json "$OUT/compare_${size}_${dev}.json" >/dev/null ) 2>&1 | tail -4 | tee -a "$OUT/summary.txt"
  done
  if [ "$DEVICE" = cuda ]; then
    $PY - "$OUT/compare_${size}_cuda.json" "$OUT/compare_${size}_cpu.json" <<'EOF' 2>&1 | tee -a "$OUT/summary.txt"
import json, math, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
worst = {"stats": 0.0, "spectrum": 0.0}
bad = []
for x, y in zip(a["tensors"], b["tensors"]):
    assert x["name"] == y["name"]
    if x["status"] != y["status"]:
        bad.append(f"{x['name']}: status {x['status']} vs {y['status']}")
    for k in ("norm_base", "norm_tuned", "norm_delta", "frac_changed", "frac_beyond_rounding"):
        u, v = x[k], y[k]
        if u is None or v is None:
            continue
        r = abs(u - v) / max(abs(v), 1e-300)
        worst["stats"] = max(worst["stats"], r)
    rx, ry = x.get("rank") or {}, y.get("rank") or {}
    if rx and ry:
        if rx["numerical_rank"] != ry["numerical_rank"]:
            bad.append(f"{x['name']}: numerical_rank {rx['numerical_rank']} vs {ry['numerical_rank']}")
        for u, v in zip(rx["spectrum"][:8], ry["spectrum"][:8]):
            worst["spectrum"] = max(worst["spectrum"], abs(u - v) / max(abs(v), 1e-300))
same = a["summary"]["verdict"] == b["summary"]["verdict"] and a["summary"]["blocks_changed"] == b["summary"]["blocks_changed"]
print(f"cuda vs cpu: verdict/blocks equal={same}; worst rel diff stats={worst['stats']:.2e} "
      f"top-8 spectrum={worst['spectrum']:.2e}; disagreements={len(bad)}")
for line in bad[:10]:
    print("  ", line)
print(f"seconds: cuda {a['run']['seconds']}, cpu {b['run']['seconds']}")
EOF
  fi
  rm -rf "$pair"
done

# the 7B pair last: the CUDA-vs-CPU check above is the one that must finish within a short lease
if [ "$DEVICE" = cuda ] && [ -z "${SKIP_7B:-}" ]; then
  pair=/tmp/wd-pair-mistral7b
  log "generate a Mistral-7B-shaped bf16 pair on the device"
  ( time timeout "${T_GEN:-300}" $PY benchmarks/gen_pair_torch.py "$pair" --device cuda ) 2>&1 | tail -5 | tee -a "$OUT/summary.txt"
  log "compare the 7B pair --device cuda, runs ${RUNS_7B:-cold,warm} (benchmarks/bench_7b.py)"
  timeout "${T_7B:-600}" $PY benchmarks/bench_7b.py "$pair" --runs "${RUNS_7B:-cold,warm}" --naive-layers 0 \
      --json "$OUT/bench_7b_cuda.json" -- --device cuda -q 2>&1 | tail -6 | tee -a "$OUT/summary.txt"
  rm -rf "$pair"
fi

# a 70B-width slice: two Llama-2-70B layers (8192 x 28672 MLP matrices), every matrix changed
if [ "$DEVICE" = cuda ] && [ -z "${SKIP_70B:-}" ]; then
  pair=/tmp/wd-pair-70b-slice
  log "generate a 70B-width slice (two layers) on the device"
  ( time timeout "${T_GEN:-300}" $PY benchmarks/gen_pair_torch.py "$pair" --size 70b-slice --device cuda ) 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
  log "compare the 70B-width slice --device cuda, runs ${RUNS_70B:-cold,warm}"
  timeout "${T_70B:-300}" $PY benchmarks/bench_7b.py "$pair" --runs "${RUNS_70B:-cold,warm}" --naive-layers 0 \
      --json "$OUT/bench_70b_slice_cuda.json" -- --device cuda -q 2>&1 | tail -6 | tee -a "$OUT/summary.txt"
  rm -rf "$pair"
fi
log "done"
