"""How the pretraining step's time and memory grow with batch, image size and model size.

    python benchmarks/scaling.py                                   # CPU defaults, float32
    python benchmarks/scaling.py --batches 64,128,256 --base_batch 128 --dtype bfloat16   # a GPU

Three sweeps around one base point (``--base_model`` at ``--base_size`` px, batch ``--base_batch``):
batch (``--batches``), image size (``--sizes``) and model (``--models``). Each point is the
trainer's step as `step_vs_torch.py` builds it (JAX only, ``--conv_impl``, mask ratio 0.75),
compiled once, then ``--steps`` timings after one warm-up step; the median is reported with the
compiled program's memory (arguments + outputs + temporaries - donated) and, on a GPU, the
process's peak. One JSON line per point, then a Markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks import hostinfo, step_vs_torch  # noqa: E402
from convmae_jax import models  # noqa: E402


def _ints(text: str, name: str, ap) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    ap.error(f"--{name} {text!r}: expected a comma list of integers >= 1")
  return values


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--base_model", default="convmae_base")
  ap.add_argument("--base_size", type=int, default=224)
  ap.add_argument("--base_batch", type=int, default=8)
  ap.add_argument("--batches", default="4,8,16")
  ap.add_argument("--sizes", default="160,224,320")
  ap.add_argument("--models", default="convmae_small,convmae_base,convmae_large")
  ap.add_argument("--conv_impl", default="visible", choices=("visible", "dense"))
  ap.add_argument("--dwconv_impl", default="auto", choices=("auto", "lax", "shift"))
  ap.add_argument("--remat", default="off", choices=("off", "on"))
  ap.add_argument("--dtype", default=None)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--inner", type=int, default=None)
  args = ap.parse_args(argv)
  batches = _ints(args.batches, "batches", ap)
  sizes = _ints(args.sizes, "sizes", ap)
  model_names = [m.strip() for m in args.models.split(",") if m.strip()]
  for m in model_names + [args.base_model]:
    if not m.startswith("convmae_") or m not in models.names():
      ap.error(f"--models/--base_model: {m!r} is not a pretraining model; accepted: "
               f"{[n for n in models.names() if n.startswith('convmae_')]}")
  for s in sizes + [args.base_size]:
    try:
      models.config_for(args.base_model, img_size=s)
    except ValueError as e:
      ap.error(f"--sizes: {e}")
  dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  inner = args.inner or (1 if jax.default_backend() == "cpu" else 5)

  points = []
  for b in batches:
    points.append(("batch", args.base_model, args.base_size, b))
  for s in sizes:
    points.append(("image size", args.base_model, s, args.base_batch))
  for m in model_names:
    points.append(("model", m, args.base_size, args.base_batch))

  device = jax.devices()[0]
  rows = []
  for sweep, model, size, batch in points:
    ns = argparse.Namespace(model=model, img_size=size, batch=batch, dtype=dtype)
    side = step_vs_torch.JaxSide(ns, args.conv_impl,
                                 models.dwconv.resolve_dwconv_impl(args.dwconv_impl),
                                 args.remat == "on", False)
    side.run(1)
    times = [side.run(inner) for _ in range(args.steps)]
    med = statistics.median(times)
    stats = getattr(device, "memory_stats", lambda: None)() or {}
    row = dict(sweep=sweep, model=model, img_size=size, batch=batch, dtype=dtype,
               conv_impl=args.conv_impl, remat=args.remat, step_s_median=round(med, 4),
               images_per_s=round(batch / med, 2),
               tflops_executed=round(side.flops_executed / med / 1e12, 3),
               gflops_executed_per_image=round(side.flops_executed / batch / 1e9, 2),
               memory_gib_compiled=(round(side.memory_bytes / 2**30, 3)
                                    if side.memory_bytes is not None else None),
               device=str(device.device_kind), cpu=hostinfo.cpu_name())
    if "peak_bytes_in_use" in stats:
      row["process_peak_gib"] = round(stats["peak_bytes_in_use"] / 2**30, 3)
    print(json.dumps(row), flush=True)
    rows.append(row)
    del side
    step_vs_torch._FLOPS_CACHE.clear()
    gc.collect()

  print("\n| sweep | model | px | batch | s/step | img/s | GFLOP/img (executed) | TFLOP/s | "
        "memory GiB (compiled) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['sweep']} | {r['model']} | {r['img_size']} | {r['batch']} | {r['step_s_median']:.3f} "
          f"| {r['images_per_s']:.2f} | {r['gflops_executed_per_image']:.1f} | "
          f"{r['tflops_executed']:.3f} | {r['memory_gib_compiled']} |")


if __name__ == "__main__":
  main()
