"""Does `jax.checkpoint` lower XLA:CPU's compiled peak? A 12-layer MLP, under both CPU schedulers.

    python benchmarks/remat_cpu.py

For each scheduler (XLA:CPU's default concurrency-optimized one, and the memory-oriented one that
`--xla_cpu_enable_concurrency_optimized_scheduler=false` selects) and each way of building the
layers (plain; `jax.checkpoint`; a custom VJP whose backward recomputes the layer only after an
optimization barrier that also holds the incoming cotangent), the temporaries of the compiled
gradient step. Nothing runs; each scheduler needs its own process, because XLA reads its flags once.
One JSON line per (scheduler, mode).
"""

import json
import os
import subprocess
import sys

FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def measure():
  import jax
  import jax.numpy as jnp

  def layer(p, x):
    w1, w2 = p
    return x + jnp.tanh(jax.nn.gelu(x @ w1) @ w2)     # a 4x hidden layer keeps several tensors

  def barrier_checkpoint(f):
    @jax.custom_vjp
    def g(p, x):
      return f(p, x)

    def fwd(p, x):
      return f(p, x), (p, x)

    def bwd(res, ct):
      res, ct = jax.lax.optimization_barrier((res, ct))   # recompute only once ct exists
      return jax.vjp(f, *res)[1](ct)

    g.defvjp(fwd, bwd)
    return g

  modes = {"plain": layer, "jax.checkpoint": jax.checkpoint(layer),
           "barrier_checkpoint": barrier_checkpoint(layer)}
  ps = [(jnp.zeros((512, 2048)), jnp.zeros((2048, 512))) for _ in range(12)]
  x = jnp.zeros((4096, 512))
  for mode, fn in modes.items():
    def loss(ps, x, fn=fn):
      for p in ps:
        x = fn(p, x)
      return jnp.sum(x ** 2)
    mem = jax.jit(jax.grad(loss)).lower(ps, x).compile().memory_analysis()
    print(json.dumps({"scheduler": "memory" if FLAG in os.environ.get("XLA_FLAGS", "")
                      else "default", "mode": mode,
                      "temp_mb": round(mem.temp_size_in_bytes / 1e6)}), flush=True)


def main():
  if "--child" in sys.argv:
    measure()
    return
  for flags in ("", FLAG):
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip(),
               JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, os.path.abspath(__file__), "--child"], env=env, check=True)


if __name__ == "__main__":
  main()
