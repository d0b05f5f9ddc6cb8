"""Times ConvViT's matrix products under XLA:CPU's two libraries (YNNPACK, XLA's default, and
XLA's own Eigen products), in one process, in turns.

    python benchmarks/cpu_matmuls.py --model convvit_base --img_size 224 --batch 8

Every linear layer's product of the model at that batch (rows = pixels of the stage map or tokens,
stage by stage), in its three forms of a training step: forward ``x @ w``, the input gradient
``dy @ w.T`` and the weight gradient ``x.T @ dy``. Each form is jitted twice, once with XLA's
defaults and once with ``compiler_options`` that move its products out of YNNPACK
(``train/xla_cpu.py``: what ``config.cpu_matmuls`` sets per program), and the two take turns.
Prints one JSON line per (product, form): both medians in ms and Eigen's speed over YNNPACK's.

    python benchmarks/cpu_matmuls.py --forward convvit_seg_base --img_size 512 --batch 1

``--forward MODEL`` times a whole evaluation forward pass instead (a ConvViT classifier, or for
``convvit_seg_*`` the UperNet segmentor on that backbone, in eval mode), the two libraries in turns:
one JSON line.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from benchmarks import hostinfo  # noqa: E402
from convmae_jax import models  # noqa: E402
from convmae_jax.train import xla_cpu  # noqa: E402

FORMS = {
    "forward": lambda x, w, dy: x @ w,
    "input_grad": lambda x, w, dy: lax.dot_general(dy, w, (((1,), (1,)), ((), ()))),
    "weight_grad": lambda x, w, dy: lax.dot_general(x, dy, (((0,), (0,)), ((), ()))),
}


def products(config, batch: int) -> list[tuple[str, int, int, int]]:
  """(name, rows, in, out) of every distinct linear-layer product of a ConvViT/ConvMAE encoder."""
  p1, p2, p3 = config.patch_sizes
  out = []
  for stage, (stride, width, ratio) in enumerate(zip((p1, p1 * p2, p1 * p2 * p3), config.embed_dims,
                                                     config.mlp_ratios), start=1):
    rows = batch * (config.img_size // stride) ** 2
    hidden = int(width * ratio)
    if stage < 3:
      out.append((f"stage{stage} conv1/conv2", rows, width, width))
    else:
      out += [("stage3 qkv", rows, width, 3 * width), ("stage3 proj", rows, width, width)]
    out += [(f"stage{stage} fc1", rows, width, hidden), (f"stage{stage} fc2", rows, hidden, width)]
  return out


def _forward_program(name: str, img_size: int):
  """(jit-able fn(params, rest, images), params, rest) of ``name``'s eval-mode forward pass."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from convmae_jax.models import upernet  # pylint: disable=import-outside-toplevel
  if name.startswith("convvit_seg_"):
    model = upernet.create_segmentor(name, rngs=nnx.Rngs(0), img_size=img_size)
  else:
    model = models.create(name, rngs=nnx.Rngs(0), img_size=img_size)
  model.eval()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return (lambda p, r, x: nnx.merge(graphdef, p, r)(x)), params, rest


def time_forward(args) -> dict:
  fn, params, rest = _forward_program(args.forward, args.img_size)
  images = jnp.asarray(np.random.default_rng(0).normal(
      size=(args.batch, args.img_size, args.img_size, 3)), jnp.float32)
  sides = {"ynnpack": jax.jit(fn), "eigen": jax.jit(fn, compiler_options={xla_cpu.YNN_OPTION: ""})}
  outs = {lib: jax.block_until_ready(f(params, rest, images)) for lib, f in sides.items()}
  times = {lib: [] for lib in sides}
  for _ in range(args.repeats):
    for lib, f in sides.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(params, rest, images))
      times[lib].append(time.perf_counter() - t0)
  s = {lib: statistics.median(t) for lib, t in times.items()}
  ref = np.asarray(jax.tree.leaves(outs["ynnpack"])[0])
  got = np.asarray(jax.tree.leaves(outs["eigen"])[0])
  config = models.config_for(args.forward, img_size=args.img_size)
  return {"forward": args.forward, "img_size": args.img_size, "batch": args.batch,
          "ynnpack_s": round(s["ynnpack"], 4), "eigen_s": round(s["eigen"], 4),
          "eigen_speed": round(s["ynnpack"] / s["eigen"], 3),
          "stage1_product": xla_cpu.stage1_product(config, args.batch),
          "auto_picks": xla_cpu.resolve("auto", forward_only=True, product=xla_cpu.stage1_product(
              config, args.batch)),
          "max_rel_diff": float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-30)),
          "cpu": hostinfo.cpu_name()}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="convvit_base")
  ap.add_argument("--img_size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=5, help="timed calls per library and form")
  ap.add_argument("--forward", default="",
                  help="a model name: time its evaluation forward pass instead of the products")
  args = ap.parse_args()
  if jax.default_backend() != "cpu":
    ap.error(f"this compares XLA:CPU's libraries; the default backend is {jax.default_backend()}")
  if xla_cpu.user_flag_set():
    ap.error(f"XLA_FLAGS sets --{xla_cpu.YNN_OPTION}; unset it to compare the libraries")
  if args.forward:
    print(json.dumps(time_forward(args)), flush=True)
    return
  config = models.config_for(args.model, img_size=args.img_size)
  eigen = {xla_cpu.YNN_OPTION: ""}
  rng = np.random.default_rng(0)
  for name, rows, k, n in products(config, args.batch):
    x = jnp.asarray(rng.normal(size=(rows, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(rows, n)), jnp.float32)
    for form, fn in FORMS.items():
      sides = {"ynnpack": jax.jit(fn), "eigen": jax.jit(fn, compiler_options=eigen)}
      outs = {lib: f(x, w, dy).block_until_ready() for lib, f in sides.items()}
      times = {lib: [] for lib in sides}
      for _ in range(args.repeats):
        for lib, f in sides.items():
          t0 = time.perf_counter()
          f(x, w, dy).block_until_ready()
          times[lib].append(time.perf_counter() - t0)
      ms = {lib: statistics.median(t) * 1e3 for lib, t in times.items()}
      ref = np.asarray(outs["ynnpack"])
      print(json.dumps({
          "model": args.model, "img_size": args.img_size, "batch": args.batch, "product": name,
          "form": form, "m_k_n": [rows, k, n] if form != "weight_grad" else [k, rows, n],
          "ynnpack_ms": round(ms["ynnpack"], 4), "eigen_ms": round(ms["eigen"], 4),
          "eigen_speed": round(ms["ynnpack"] / ms["eigen"], 3),
          "max_rel_diff": float(np.max(np.abs(np.asarray(outs["eigen"]) - ref))
                                / max(float(np.max(np.abs(ref))), 1e-30)),
          "cpu": hostinfo.cpu_name()}), flush=True)


if __name__ == "__main__":
  main()
