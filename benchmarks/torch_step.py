"""Times one pretraining step of the PyTorch twin of ConvMAE (the official formulation: dense
conv stages, float32), as the reference beside `model_step.py`.

    python benchmarks/torch_step.py --model convmae_base --img_size 224 --batch 8 --steps 5

Prints one JSON line like `model_step.py`. Uses all CPU threads torch sees (torch.get_num_threads()).
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from convmae_jax import interop  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="convmae_base")
  ap.add_argument("--img_size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2)
  args = ap.parse_args()

  torch.manual_seed(0)
  model = interop.torch_model(args.model, img_size=args.img_size)
  opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                          betas=(0.9, 0.95), weight_decay=0.05)
  images = torch.randn(args.batch, 3, args.img_size, args.img_size)
  length = (args.img_size // 16) ** 2
  times = []
  for i in range(args.warmup + args.steps):
    noise = torch.rand(args.batch, length)
    t0 = time.perf_counter()
    loss, _, _ = model(images, noise=noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  print(json.dumps({
      "framework": f"torch {torch.__version__}", "model": args.model, "img_size": args.img_size,
      "batch": args.batch, "threads": torch.get_num_threads(), "step_s_median": round(med, 4),
      "step_s_all": [round(t, 4) for t in times], "images_per_s": round(args.batch / med, 2),
      "final_loss": float(loss)}))


if __name__ == "__main__":
  main()
