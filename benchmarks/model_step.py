"""Times one ConvMAE pretraining step (forward + backward + AdamW) on the default backend.

    python benchmarks/model_step.py --model convmae_base --img_size 224 --batch 8 --steps 5
    python benchmarks/model_step.py --model convmae_tiny --img_size 64 --batch 64 --dwconv_impl lax
    python benchmarks/model_step.py --model convmae_base --conv_impl dense   # the official formulation

Prints one JSON line: step time (median of --steps after --warmup), images/s, images/s/device,
compile time, and the configuration. Results go into BENCHMARKS.md by hand, with the machine.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import optax
from flax import nnx

from benchmarks import hostinfo  # noqa: E402
from convmae_jax import models


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="convmae_base")
  ap.add_argument("--img_size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--dwconv_impl", default="auto")
  ap.add_argument("--conv_impl", default="visible", help="visible | dense (same function)")
  ap.add_argument("--grad_barrier", default="on", choices=("on", "off"),
                  help="off: layers.grad_barrier becomes the plain identity (to measure what it saves)")
  ap.add_argument("--dwconv_kernel_grad", default="matmul", choices=("matmul", "taps"),
                  help="the shift depthwise conv's kernel gradient: matmul (the model's) or taps "
                       "(K² shifted products, the form before)")
  hostinfo.add_host_malloc_flag(ap)
  args = ap.parse_args()
  hostinfo.apply_host_malloc(args)     # before JAX starts its backend
  if args.grad_barrier == "off":
    models.layers.grad_barrier = lambda x: x
  if args.dwconv_kernel_grad == "taps":
    models.dwconv._kernel_grad = models.dwconv._kernel_grad_taps

  model = models.create(args.model, rngs=nnx.Rngs(0), img_size=args.img_size, dtype=args.dtype,
                        dwconv_impl=args.dwconv_impl, conv_impl=args.conv_impl)
  tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.05)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = tx.init(params)

  def step(params, opt_state, images, key):
    noise = jax.random.uniform(key, (images.shape[0], model.num_patches))

    def loss_fn(p):
      loss, _, _ = nnx.merge(graphdef, p, rest)(images, noise=noise)
      return loss

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  images = jax.random.normal(jax.random.key(0), (args.batch, args.img_size, args.img_size, 3))
  t0 = time.perf_counter()
  compiled = step.lower(params, opt_state, images, jax.random.key(1)).compile()
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    params, opt_state, loss = compiled(params, opt_state, images, jax.random.key(i))
    loss.block_until_ready()
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  n_dev = 1
  print(json.dumps({
      "model": args.model, "img_size": args.img_size, "batch": args.batch, "dtype": args.dtype,
      "dwconv_impl": models.dwconv.resolve_dwconv_impl(args.dwconv_impl),
      "conv_impl": args.conv_impl, "grad_barrier": args.grad_barrier,
      "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
      "cpu": hostinfo.cpu_name(),
      "step_s_median": round(med, 4), "step_s_all": [round(t, 4) for t in times],
      "images_per_s": round(args.batch / med, 2), "images_per_s_per_device": round(args.batch / med / n_dev, 2),
      "compile_s": round(compile_s, 1), "final_loss": float(loss)}))


if __name__ == "__main__":
  main()
