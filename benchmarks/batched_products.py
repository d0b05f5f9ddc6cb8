"""Times ConvViT's batched matrix products on XLA:CPU beside the same work as one 2-D product and
beside PyTorch's ``bmm``, with how many cores each kept busy.

    python benchmarks/batched_products.py --model convvit_base --img_size 224 --batch 8

The batched products of a fine-tuning step: attention's q·kᵀ and p·v (batch × heads products of
the stage-3 tokens; their gradients have the same shapes) and, per conv stage, one of the
depthwise conv's kernel-gradient products (`dwconv._kernel_grad`: channels ×
((W+4) × (H·N)) · ((H·N) × W), five per conv block). Each is timed as JAX computes it
(``lax.dot_general`` with batch axes: XLA:CPU hands it to YNNPACK, which runs it on one thread),
followed by `dwconv.rows_parallel` (the identity; fused with a reduction over its rows, the
product runs on every core: the depthwise kernel gradient's form), as one 2-D product of the
same multiply-adds (the batch folded into the rows: not the same function, only the rate both
cores give to this much work), and as ``torch.bmm``. Besides the median ms and GFLOP/s, each
side's process CPU time over wall time says how many cores it used (2.0 = both of a 2-core
machine). Prints one JSON line per product.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import hostinfo  # noqa: E402


def products(config, batch: int) -> list[tuple[str, int, int, int, int]]:
  """(name, batch, m, k, n) of the distinct batched products of a ConvViT fine-tuning step."""
  p1, p2, p3 = config.patch_sizes
  tokens = (config.img_size // (p1 * p2 * p3)) ** 2
  head_dim = config.embed_dims[2] // config.num_heads
  out = [("attention q·kᵀ", batch * config.num_heads, tokens, head_dim, tokens),
         ("attention p·v", batch * config.num_heads, tokens, tokens, head_dim)]
  for stage, stride in ((1, p1), (2, p1 * p2)):
    side = config.img_size // stride
    out.append((f"stage{stage} depthwise kernel gradient", config.embed_dims[stage - 1], side + 4,
                side * batch, side))
  return out


def _timed(fn, repeats: int) -> tuple[float, float]:
  """(median seconds, process CPU seconds / wall seconds) of ``repeats`` calls after one."""
  fn()
  times, cpu0 = [], time.process_time()
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), (time.process_time() - cpu0) / sum(times)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default="convvit_base")
  ap.add_argument("--img_size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=15, help="timed calls per side and product")
  hostinfo.add_host_malloc_flag(ap)
  args = ap.parse_args(argv)
  for name in ("img_size", "batch", "repeats"):
    if getattr(args, name) < 1:
      ap.error(f"--{name} {getattr(args, name)} is not valid: expected >= 1")
  host_malloc_reuse = hostinfo.apply_host_malloc(args)     # before JAX starts its backend

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from jax import lax

  from convmae_jax import models

  config = models.config_for(args.model, img_size=args.img_size)
  batched = jax.jit(lambda a, b: lax.dot_general(a, b, (((2,), (1,)), ((0,), (0,)))))
  rows_parallel = jax.jit(lambda a, b: models.dwconv.rows_parallel(
      lax.dot_general(a, b, (((2,), (1,)), ((0,), (0,))))))
  flat = jax.jit(lambda a, b: a.reshape(-1, a.shape[-1]) @ b[0])
  rng = np.random.default_rng(0)
  for name, nb, m, k, n in products(config, args.batch):
    a = rng.normal(size=(nb, m, k)).astype(np.float32)
    b = rng.normal(size=(nb, k, n)).astype(np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    gflop = 2.0 * nb * m * k * n / 1e9
    sides = {"jax": lambda: jax.block_until_ready(batched(ja, jb)),
             "jax_rows_parallel": lambda: jax.block_until_ready(rows_parallel(ja, jb)),
             "jax_2d_same_work": lambda: jax.block_until_ready(flat(ja, jb)),
             "torch_bmm": lambda: torch.bmm(ta, tb)}
    row = {"product": name, "shape": [nb, m, k, n], "gflop": round(gflop, 9)}
    for side, fn in sides.items():
      seconds, cores = _timed(fn, args.repeats)
      row.update({f"{side}_ms": round(seconds * 1e3, 4),
                  f"{side}_gflops": round(gflop / seconds, 3),
                  f"{side}_cpu_per_wall": round(cores, 2)})
    row.update({"jax_vs_torch_speed": round(row["torch_bmm_ms"] / row["jax_ms"], 3),
                "model": args.model, "img_size": args.img_size, "batch": args.batch,
                "cpu": hostinfo.cpu_name(), "cores": os.cpu_count(),
                "torch_threads": torch.get_num_threads(), "host_malloc_reuse": host_malloc_reuse})
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
