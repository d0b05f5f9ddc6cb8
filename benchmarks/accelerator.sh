#!/usr/bin/env bash
# Every accelerator figure of BENCHMARKS.md in one command (about 10 minutes on one H100/H200):
#
#   bash benchmarks/accelerator.sh [OUTDIR]        # default OUTDIR: ./bench_out
#
# Needs a Python with jax (CUDA or TPU build), flax, optax, numpy and, for the PyTorch twin, torch
# with CUDA (PYTHON=... picks it; default python3). Writes one .jsonl per part plus the log; each
# part is independent, so a failure in one does not stop the others.
#   1. ConvMAE-B, 224 px, bfloat16, batch 128: visible/dense x dwconv lax/shift, and the twin under
#      torch.autocast (bfloat16), alternating in one process.
#   2. The same at batch 256 with remat off/on and complementary masks off/on (visible, lax).
#   3. The scaling table (batch 64/128/256, 160/224/320 px, small/base/large).
#   4. A jax.profiler trace of the default step (visible, auto) for TensorBoard / Perfetto.
#   5. The detection (1024 px) and segmentation (512 px) Base backbones beside their twins, batch 1:
#      float32, then bfloat16 with remat (what remat saves, which XLA:CPU does not show).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }

log "devices: $($PY -c 'import jax; print(jax.devices())' 2>&1 | tail -1)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | tee -a "$OUT/log.txt"

log "1. step_vs_torch batch 128"
timeout 240 $PY benchmarks/step_vs_torch.py --model convmae_base --batch 128 --dtype bfloat16 \
  --conv_impl visible,dense --dwconv_impl lax,shift --steps 5 --inner 5 \
  > "$OUT/step_b128.jsonl" 2>> "$OUT/log.txt" || log "part 1 failed ($?)"

log "2. step_vs_torch batch 256, remat and complementary masks"
timeout 240 $PY benchmarks/step_vs_torch.py --model convmae_base --batch 256 --dtype bfloat16 \
  --conv_impl visible --dwconv_impl lax --remat off,on --complementary off,on --steps 5 --inner 5 \
  > "$OUT/step_b256.jsonl" 2>> "$OUT/log.txt" || log "part 2 failed ($?)"

log "3. scaling"
timeout 200 $PY benchmarks/scaling.py --batches 64,128,256 --base_batch 128 --dtype bfloat16 \
  --steps 3 > "$OUT/scaling.txt" 2>> "$OUT/log.txt" || log "part 3 failed ($?)"

log "4. profile"
timeout 90 $PY - "$OUT/profile" >> "$OUT/log.txt" 2>&1 <<'EOF' || log "part 4 failed ($?)"
import sys
import jax
sys.path.insert(0, ".")
from benchmarks import step_vs_torch as b
args, _ = b.parse_args(["--model", "convmae_base", "--batch", "128", "--dtype", "bfloat16"])
side = b.JaxSide(args, "visible", "lax", False, False)
side.run(3)
with jax.profiler.trace(sys.argv[1]):
  side.run(5)
print("profile written to", sys.argv[1])
EOF
log "5. backbones"
for extra in "" "--dtype bfloat16 --remat"; do
  timeout 200 $PY benchmarks/backbone_step.py --jobs det:1024,seg:512 --size base --steps 5 \
    --warmup 2 $extra >> "$OUT/backbone.jsonl" 2>> "$OUT/log.txt" || log "part 5 failed ($?)"
done
log "done"
