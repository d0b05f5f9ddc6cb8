#!/usr/bin/env bash
# The accelerator figures of BENCHMARKS.md in one command, at most 8 minutes on one H100/H200 (the
# per-part timeouts below sum to 480 s):
#
#   bash benchmarks/accelerator.sh [OUTDIR]        # default OUTDIR: ./bench_out
#
# Needs a Python with jax (CUDA or TPU build), flax, optax, numpy and, for the PyTorch twin, torch
# with CUDA (PYTHON=... picks it; default python3). Writes one .jsonl per part plus the log; each
# part is independent, so a failure or timeout in one does not stop the others.
#   1. ConvMAE-B, 224 px, bfloat16, batch 128 (visible, depthwise lax): attention_impl explicit,
#      xla and cudnn (cuDNN flash attention; off a CUDA GPU the part is refused, run explicit,xla
#      there), and the twin under torch.autocast (bfloat16), alternating in one process.
#   2. The same at batch 256, visible and dense (the official formulation) conv stages, attention
#      auto, beside the twin.
#   3. A jax.profiler trace of the default step (visible, lax, attention auto) for TensorBoard /
#      Perfetto.
#   4. The detection backbone (Base, 1024 px, batch 1) in bfloat16 with remat beside its twin, with
#      attention explicit, then auto (cuDNN in window and global blocks on a CUDA GPU).
#   5. The UperNet training step (segmentation backbone Base, 512 px, batch 2 as the official
#      recipe's per-GPU batch, 150 classes) in bfloat16 beside the twin under torch.autocast.
# Not in the 8 minutes (commands in README, "Performance notes"): the depthwise lax/shift pair,
# remat and complementary masks in step_vs_torch.py, the scaling table (scaling.py), the float32
# and segmentation backbones, the UperNet step in float32.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }

log "devices: $($PY -c 'import jax; print(jax.devices())' 2>&1 | tail -1)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | tee -a "$OUT/log.txt"

log "1. step_vs_torch batch 128, attention explicit / xla / cudnn"
timeout 140 $PY benchmarks/step_vs_torch.py --model convmae_base --batch 128 --dtype bfloat16 \
  --conv_impl visible --dwconv_impl lax --attention_impl explicit,xla,cudnn --steps 5 --inner 3 \
  > "$OUT/step_b128_attention.jsonl" 2>> "$OUT/log.txt" || log "part 1 failed ($?)"

log "2. step_vs_torch batch 256, visible and dense conv stages"
timeout 100 $PY benchmarks/step_vs_torch.py --model convmae_base --batch 256 --dtype bfloat16 \
  --conv_impl visible,dense --dwconv_impl lax --attention_impl auto --steps 3 --inner 3 \
  > "$OUT/step_b256.jsonl" 2>> "$OUT/log.txt" || log "part 2 failed ($?)"

log "3. profile"
timeout 60 $PY - "$OUT/profile" >> "$OUT/log.txt" 2>&1 <<'EOF' || log "part 3 failed ($?)"
import sys
import jax
sys.path.insert(0, ".")
from benchmarks import step_vs_torch as b
args, _ = b.parse_args(["--model", "convmae_base", "--batch", "128", "--dtype", "bfloat16"])
side = b.JaxSide(args, "visible", "lax", False, False, "auto")
side.run(2)
with jax.profiler.trace(sys.argv[1]):
  side.run(3)
print("profile written to", sys.argv[1], "attention:", side.meta["attention_impl_resolved"])
EOF
log "4. detection backbone, bfloat16 + remat, attention explicit then auto"
for attn in explicit auto; do
  timeout 55 $PY benchmarks/backbone_step.py --jobs det:1024 --size base --steps 3 --warmup 1 \
    --dtype bfloat16 --remat --attention_impl "$attn" >> "$OUT/backbone.jsonl" \
    2>> "$OUT/log.txt" || log "part 4 ($attn) failed ($?)"
done
log "5. UperNet step (segmentation), Base 512 px, batch 2, bfloat16"
timeout 70 $PY benchmarks/segment_step.py --model convvit_seg_base --img_size 512 --batch 2 \
  --steps 3 --dtype bfloat16 > "$OUT/segment_step.jsonl" 2>> "$OUT/log.txt" || log "part 5 failed ($?)"
log "done"
