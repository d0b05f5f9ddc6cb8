"""Times one stride-1 3x3 "same" conv, forward + backward (input and kernel gradients), in the forms
the UperNet heads can use, beside PyTorch's conv2d (oneDNN on CPU), in one process:

    python benchmarks/head_conv.py --shape 2x64x64x768 --out 768

* ``lax``: ``lax.conv_general_dilated`` (the heads' ``conv_impl="lax"``);
* ``matmul``: ``upernet.conv_as_matmuls`` (``conv_impl="matmul"``, the default on CPU): the
  nine shifted views of the narrower side (the input when the conv widens, the products of the
  input with the nine taps when it narrows) and one matmul, with its written-out backward;
* ``im2col``: the nine views of the input concatenated along channels, one matmul, autodiff;
* ``torch``: ``torch.nn.functional.conv2d`` + ``backward``.

Prints one JSON line per form: the best of ``--repeats`` timings (after one warm-up), the
largest difference of its output from ``lax``'s and, for the JAX forms, the compiled memory: what
the forward keeps for the backward (``residual_bytes``) and the transient buffers of forward +
backward (``fwd_bwd_temp_bytes``).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import hostinfo  # noqa: E402
from convmae_jax.models import upernet  # noqa: E402


def im2col_conv(x, w):
  k = w.shape[0]
  h, wd = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
  cols = jnp.concatenate([xp[:, i:i + h, j:j + wd, :] for i in range(k) for j in range(k)], -1)
  return jnp.einsum("nhwk,ko->nhwo", cols, w.reshape(-1, w.shape[-1]))


def lax_conv(x, w):
  p = w.shape[0] // 2
  return jax.lax.conv_general_dilated(x, w, (1, 1), [(p, p), (p, p)],
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def best_time(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shape", default="2x64x64x768", help="NxHxWxC of the input")
  ap.add_argument("--out", type=int, default=768, help="output channels")
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  try:
    n, h, w, c = (int(v) for v in args.shape.split("x"))
  except ValueError:
    sys.exit(f"error: --shape {args.shape!r} is not accepted: expected NxHxWxC, e.g. 2x64x64x768")
  rng = np.random.default_rng(0)
  x = rng.standard_normal((n, h, w, c)).astype(np.float32)
  k = (0.01 * rng.standard_normal((3, 3, c, args.out))).astype(np.float32)
  xj, kj = jnp.asarray(x), jnp.asarray(k)
  ref = np.asarray(jax.jit(lax_conv)(xj, kj))
  common = {"shape": [n, h, w, c], "out": args.out, "backend": jax.default_backend(),
            "cpu": hostinfo.cpu_name()}
  for name, conv in (("lax", lax_conv), ("matmul", upernet.conv_as_matmuls),
                     ("im2col", im2col_conv)):
    grad = jax.jit(jax.grad(lambda a, b: 1e-6 * jnp.sum(conv(a, b) ** 2), argnums=(0, 1)))
    seconds = best_time(lambda: jax.block_until_ready(grad(xj, kj)), args.repeats)
    diff = float(np.max(np.abs(np.asarray(jax.jit(conv)(xj, kj)) - ref)))
    # Compiled memory: what the forward keeps for the backward (the VJP's residuals), and the
    # fwd+bwd program's transient buffers.
    kept = jax.jit(lambda a, b, conv=conv: jax.vjp(conv, a, b)[1]).lower(xj, kj).compile()
    temp = grad.lower(xj, kj).compile().memory_analysis()
    print(json.dumps({"form": name, "s_fwd_bwd": round(seconds, 4), "max_abs_diff_vs_lax": diff,
                      "residual_bytes": int(kept.memory_analysis().output_size_in_bytes),
                      "fwd_bwd_temp_bytes": int(temp.temp_size_in_bytes), **common}),
          flush=True)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_()
  kt = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous().requires_grad_()

  def torch_step():
    xt.grad = kt.grad = None
    y = torch.nn.functional.conv2d(xt, kt, padding=1)
    (1e-6 * y.pow(2).sum()).backward()

  seconds = best_time(torch_step, args.repeats)
  with torch.no_grad():
    y = torch.nn.functional.conv2d(xt, kt, padding=1).permute(0, 2, 3, 1).numpy()
  print(json.dumps({"form": "torch", "s_fwd_bwd": round(seconds, 4),
                    "max_abs_diff_vs_lax": float(np.max(np.abs(y - ref))),
                    "torch_threads": torch.get_num_threads(), **common}), flush=True)


if __name__ == "__main__":
  main()
