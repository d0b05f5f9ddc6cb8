"""Times an UperNet training step on the ConvMAE segmentation backbone, JAX beside the PyTorch twin,
in one run.

    python benchmarks/segment_step.py --model convvit_seg_base --img_size 512 --batch 2 --steps 5

The step: forward of backbone + UPerHead + FCN auxiliary head (150 classes), both heads' logits
resized to the labels, CE (ignore 255) + 0.4 x auxiliary, backward, AdamW with the segmentation
layer decay (the JAX step is `train.step.build_train_step` with the segment job's optimizer, as the
trainer runs it; the twin uses torch.optim.AdamW). Drop path 0.2, dropout 0.1, BatchNorm in train
mode on both sides. The sides alternate A B A B and the medians are compared. Prints one JSON line
with each side's median step time, images/s and the JAX/PyTorch speed ratio.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from convmae_jax import models  # noqa: E402
from convmae_jax.interop import torch_segmentor  # noqa: E402
from convmae_jax.models import upernet  # noqa: E402
from convmae_jax.train import optim, sharding as sharding_lib, step as step_lib  # noqa: E402
from benchmarks import hostinfo  # noqa: E402


def jax_runner(args, images, labels):
  model = models.create_segmentor(args.model, rngs=nnx.Rngs(0), img_size=args.img_size,
                                  drop_path_rate=0.2, dtype=args.dtype,
                                  head={"num_classes": 150, "conv_impl": args.head_conv_impl})
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  cfg = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999, weight_decay=0.05, layer_decay=0.75))
  schedule = optim.WarmupPoly(peak_lr=1e-4, warmup_steps=1500, total_steps=160_000)
  tx = optim.make_segmentation_optimizer(cfg, schedule, params)
  mesh = sharding_lib.make_mesh(-1, 1)
  sh = sharding_lib.state_shardings(mesh, params, rest, tx)
  step = step_lib.build_train_step(
      graphdef=graphdef, param_filter=nnx.Param, tx=tx, schedule=schedule, shardings=sh,
      batch_size=args.batch, seed=0, batch_keys=("image", "label"),
      loss_fn=lambda m, b: m.loss(b["image"], b["label"]))
  state = [params, tx.init(params), rest]
  batch = {"image": jax.device_put(images, sh.batch), "label": jax.device_put(labels, sh.batch)}

  def run(i):
    p, o, r, metrics = step(*state, batch, np.int32(i))
    state[:] = [p, o, r]
    jax.block_until_ready(metrics["loss"])
  return run


def torch_runner(args, images, labels):
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  twin = torch_segmentor.torch_segmentor(args.model, img_size=args.img_size, drop_path_rate=0.2,
                                         head={"num_classes": 150}).to(dev).train()
  opt = torch.optim.AdamW(twin.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(dev)
  y = torch.from_numpy(labels).long().to(dev)
  amp = args.dtype == "bfloat16" and dev == "cuda"

  def run(i):
    del i
    opt.zero_grad(set_to_none=True)
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
      loss, _ = twin.loss(x, y)
    loss.backward()
    opt.step()
    if dev == "cuda":
      torch.cuda.synchronize()
  return run


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="convvit_seg_base")
  ap.add_argument("--img_size", type=int, default=512)
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--head_conv_impl", default="auto", choices=("auto", "lax", "matmul"),
                  help="the heads' convs: convolutions, shifted matmuls, or by backend")
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side first (compilation)")
  ap.add_argument("--dtype", default="bfloat16" if jax.default_backend() != "cpu" else "float32")
  args = ap.parse_args()
  rng = np.random.default_rng(0)
  images = rng.standard_normal((args.batch, args.img_size, args.img_size, 3)).astype(np.float32)
  labels = rng.integers(0, 150, (args.batch, args.img_size, args.img_size)).astype(np.int32)
  runners = {"jax": jax_runner(args, images, labels), "torch": torch_runner(args, images, labels)}
  times = {k: [] for k in runners}
  for name, run in runners.items():       # warm-up (compilation, cuDNN autotuning)
    for i in range(max(args.warmup, 1)):
      run(i)
  for i in range(args.steps):
    for name, run in runners.items():
      t0 = time.perf_counter()
      run(i + max(args.warmup, 1))
      times[name].append(time.perf_counter() - t0)
  med = {k: statistics.median(v) for k, v in times.items()}
  print(json.dumps({"model": args.model, "img_size": args.img_size, "batch": args.batch,
                    "dtype": args.dtype, "backend": jax.default_backend(), "steps": args.steps,
                    "head_conv_impl": upernet.resolve_conv_impl(args.head_conv_impl),
                    "device": str(jax.devices()[0].device_kind), "cpu": hostinfo.cpu_name(),
                    "torch_threads": torch.get_num_threads(),
                    **{f"{k}_step_s": round(v, 4) for k, v in med.items()},
                    **{f"{k}_img_per_s": float(f"{args.batch / v:.4g}") for k, v in med.items()},
                    "jax_speedup_vs_torch": round(med["torch"] / med["jax"], 3)}))


if __name__ == "__main__":
  main()
