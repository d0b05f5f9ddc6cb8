"""The written-out backward passes of `models/layers.py` against XLA's own derivatives, in one run.

    python benchmarks/written_backward.py --part stage3 --change products --rounds 11

Builds a part of ConvViT (``stage1``: patch embedding 1 + the stage-1 blocks; ``stage3``: the
transformer blocks; ``model``: the whole classifier) and compiles its forward + backward twice:
as the package has it, and with ``layers.layer_norm`` and/or the products (``layers.matmul``,
``layers.batched_matmul``, and ``layers.add_bias``, the bias after each) patched back to the plain
formulas (``--change``), so XLA derives those gradients itself. ``--dtype bfloat16`` computes the
part in bfloat16 (float32 parameters): there the products' change also covers XLA:CPU widening
bfloat16 operands to float32 and its bfloat16 bias-gradient sums. Both programs are compiled
before timing and then timed in turns, the order alternating every round, on a random output
gradient (drop path 0). Prints one JSON line: each side's median and minimum seconds, the median
of the per-round ratios (plain / written), how many rounds the written form won, and each
program's compiled temporaries (``memory_analysis``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import hostinfo  # noqa: E402


def _plain_layer_norm(x, scale, bias, eps):
  import jax.numpy as jnp
  from jax import lax
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  centered = x - mean
  var = jnp.mean(centered * centered, axis=-1, keepdims=True)
  return centered * lax.rsqrt(var + eps) * scale + bias


def build(args, plain: bool):
  """A compiled ``run()`` of the part's forward + backward and its temporaries in bytes."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from convmae_jax import models
  from convmae_jax.models import layers, transformer

  saved = layers.layer_norm, layers.matmul, transformer.batched_matmul, layers.add_bias
  if plain and args.change in ("layernorm", "both"):
    layers.layer_norm = _plain_layer_norm
  if plain and args.change in ("products", "both"):
    layers.matmul = lambda x, kernel: x @ kernel
    transformer.batched_matmul = lambda a, b: a @ b
    layers.add_bias = lambda y, bias: y + bias.astype(y.dtype)
  try:
    model = models.create(args.model, rngs=nnx.Rngs(0), img_size=args.img_size, num_classes=1000,
                          global_pool=True, drop_path_rate=0.0, dtype=args.dtype)
    side = args.img_size // model.config.patch_sizes[0]
    if args.part == "stage1":
      part, shape = nnx.List([model.patch_embed1] + list(model.blocks1)), (args.img_size,) * 2 + (3,)
    elif args.part == "stage3":
      tokens = (side // (model.config.patch_sizes[1] * model.config.patch_sizes[2])) ** 2
      part, shape = nnx.List(list(model.blocks3)), (tokens, model.config.embed_dims[2])
    else:
      part, shape = model, (args.img_size,) * 2 + (3,)
    graphdef, params = nnx.split(part, nnx.Param)

    def forward(p, x):
      module = nnx.merge(graphdef, p)
      if args.part == "model":
        return module(x)
      for blk in module:
        x = blk(x)
      return x

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(args.batch,) + shape).astype(np.float32)).astype(args.dtype)
    out = jax.eval_shape(forward, params, x)
    g = jnp.asarray(rng.normal(size=out.shape).astype(np.float32)).astype(out.dtype)
    compiled = jax.jit(lambda p, a, c: jax.vjp(forward, p, a)[1](c)).lower(params, x, g).compile()
    jax.block_until_ready(compiled(params, x, g))      # warm-up
  finally:
    layers.layer_norm, layers.matmul, transformer.batched_matmul, layers.add_bias = saved
  temp = compiled.memory_analysis().temp_size_in_bytes
  return (lambda: jax.block_until_ready(compiled(params, x, g))), temp


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--part", default="model", choices=("stage1", "stage3", "model"))
  ap.add_argument("--change", default="both", choices=("layernorm", "products", "both"))
  ap.add_argument("--model", default="convvit_base")
  ap.add_argument("--img_size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  ap.add_argument("--rounds", type=int, default=9)
  hostinfo.add_host_malloc_flag(ap)
  args = ap.parse_args(argv)
  if args.rounds < 1:
    ap.error(f"--rounds {args.rounds}: need at least 1")
  hostinfo.apply_host_malloc(args)
  runs = {"written": build(args, plain=False), "plain": build(args, plain=True)}
  times = {k: [] for k in runs}
  for r in range(args.rounds):
    for name in (("written", "plain") if r % 2 == 0 else ("plain", "written")):
      t0 = time.perf_counter()
      runs[name][0]()
      times[name].append(time.perf_counter() - t0)
  ratios = [p / w for p, w in zip(times["plain"], times["written"])]
  print(json.dumps({
      "part": args.part, "change": args.change, "model": args.model, "img_size": args.img_size,
      "batch": args.batch, "dtype": args.dtype, "rounds": args.rounds, "cpu": hostinfo.cpu_name(),
      "written_s_median": round(statistics.median(times["written"]), 4),
      "plain_s_median": round(statistics.median(times["plain"]), 4),
      "written_s_min": round(min(times["written"]), 4), "plain_s_min": round(min(times["plain"]), 4),
      "speedup_median_of_rounds": round(statistics.median(ratios), 3),
      "written_faster_rounds": sum(w < p for w, p in zip(times["written"], times["plain"])),
      "written_temp_bytes": runs["written"][1], "plain_temp_bytes": runs["plain"][1]}))


if __name__ == "__main__":
  main()
