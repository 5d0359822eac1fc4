#!/usr/bin/env bash
# On a CUDA machine: where the whole-process resident set of `compare --device cuda` goes (issue 15's 1 GB),
# on the Mistral-7B-shaped pair generated on the device: the runtime alone step by step, then
# benchmarks/cuda_rss.py (peak_stack --maps) at several stream depths and window sizes.
#   VARIANTS="3:16777216 2:16777216" bash benchmarks/device_rss.sh     # results in $OUT (or ./device-out)
set -u
OUT=${OUT:-device-out}
PY=${PY:-python3}
VARIANTS=${VARIANTS-"3:16777216 2:16777216 2:8388608 1:16777216"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
log "host: $(nproc) cores; $($PY -c 'import torch;print(torch.__version__, torch.cuda.get_device_name(0))' 2>&1); CUDA_MODULE_LOADING=${CUDA_MODULE_LOADING:-unset}"
if [ -z "${SKIP_INSTALL:-}" ]; then
  $PY -m pip install -q --no-deps --no-build-isolation --no-index . >"$OUT/install.txt" 2>&1 \
    || { log "install failed"; tail -5 "$OUT/install.txt"; exit 1; }
fi
log "the runtime alone, step by step (MB: rss anon file shmem)"
$PY - <<'PYEOF' 2>&1 | tee -a "$OUT/summary.txt"
import sys
sys.path = [p for p in sys.path if p not in ("", ".")]   # the installed weightdiff, not the work tree's folder
def st(what):
    d = {}
    for ln in open("/proc/self/status"):
        k = ln.split(":")[0]
        if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            d[k] = int(ln.split()[1]) >> 10
    print(f"  {what:<40} {d['VmRSS']:>5} {d['RssAnon']:>5} {d['RssFile']:>5} {d['RssShmem']:>5}", flush=True)
st("python")
import numpy
st("numpy")
import torch
st("import torch")
torch.cuda.init(); x = torch.ones(1, device="cuda"); torch.cuda.synchronize()
st("cuda context")
a = torch.randn(512, 512, device="cuda", dtype=torch.float64); b = a @ a.T; torch.cuda.synchronize()
st("cublas float64 matmul")
w = torch.linalg.eigvalsh(b); torch.cuda.synchronize()
st("cusolver eigvalsh")
p = torch.empty(32 << 20, dtype=torch.uint8, pin_memory=True)
st("one 32 MB pinned buffer")
del p
import weightdiff.cli
st("import weightdiff.cli")
from weightdiff.kernels import cpu  # noqa
st("import weightdiff.kernels.cpu (numba)")
sys.path.insert(0, "benchmarks")
from peak_stack import big_mappings
print("  mappings with 8 MB or more resident (resident MB, size MB, name):")
for r, z, n in big_mappings(8):
    print(f"  {r:>6} {z:>6}  {n}")
PYEOF
[ -z "$VARIANTS" ] && { log done; exit 0; }
pair=/tmp/wd-rss-7b
log "generate the Mistral-7B-shaped pair on the device"
( time timeout 150 $PY benchmarks/gen_pair_torch.py "$pair" --device cuda ) 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
for v in $VARIANTS; do
  d=${v%%:*}; w=${v##*:}
  log "compare --device cuda, depth $d, window $w elements"
  timeout 150 $PY benchmarks/cuda_rss.py --depth "$d" --window "$w" --log "$OUT/rss_${d}_${w}.txt" -- \
    compare "$pair/base" "$pair/tuned" --device cuda --quiet --json "$OUT/c7_${d}_${w}.json" >"$OUT/rss_${d}_${w}.out" 2>&1
  echo "  exit $?" | tee -a "$OUT/summary.txt"
  head -1 "$OUT/rss_${d}_${w}.txt" | tee -a "$OUT/summary.txt"
  tail -1 "$OUT/rss_${d}_${w}.txt" | tee -a "$OUT/summary.txt"
done
rm -rf "$pair"
log done
