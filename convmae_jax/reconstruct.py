r"""Reconstructions of any images by any pretraining checkpoint, as a PNG grid.

    python -m convmae_jax.reconstruct --checkpoint runs/convmae_base --out grid.png cat.jpg dog.png
    python -m convmae_jax.reconstruct --checkpoint convmae_base.pth --out grid.png --mask_ratio 0.5 *.jpg

Columns: original | masked | reconstruction (visible patches pasted back) | raw prediction; one row
per image (its central square, resized to the model's image size). ``--checkpoint`` takes what
``convmae_jax.load`` takes: a training workdir (``--step`` picks a step), a model-only checkpoint, a
``.pth`` or a ``.safetensors`` file. Exit status 2 with a message on bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="python -m convmae_jax.reconstruct", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("images", nargs="+", help="image files (any format Pillow reads)")
  ap.add_argument("--checkpoint", required=True, help="workdir, checkpoint folder, .pth or .safetensors")
  ap.add_argument("--out", required=True, help="PNG file to write")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step of a folder (default: latest)")
  ap.add_argument("--mask_ratio", type=float, default=None, help="default: the model's (0.75)")
  ap.add_argument("--seed", type=int, default=0, help="seed of the masks")
  ap.add_argument("--no_prediction", action="store_true", help="leave out the raw-prediction column")
  return ap


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  missing = [p for p in args.images if not os.path.isfile(p)]
  if missing:
    print(f"error: no such image file(s): {missing}", file=sys.stderr)
    return 2
  if args.mask_ratio is not None and not 0.0 < args.mask_ratio < 1.0:
    print(f"error: --mask_ratio={args.mask_ratio} must lie strictly between 0 and 1", file=sys.stderr)
    return 2
  if not args.out.lower().endswith(".png"):
    print(f"error: --out={args.out!r} must name a .png file", file=sys.stderr)
    return 2
  from convmae_jax import api, models  # pylint: disable=import-outside-toplevel
  try:
    model = api.load(args.checkpoint, step=args.step)
    if not isinstance(model, models.ConvMAE):
      raise ValueError(f"{args.checkpoint} holds a classifier ({type(model).__name__}); "
                       "reconstructions need a pretraining checkpoint")
    grid = api.reconstruct(model, args.images, seed=args.seed, mask_ratio=args.mask_ratio,
                           out=args.out, show_prediction=not args.no_prediction)
  except (FileNotFoundError, ValueError, TypeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.out} ({grid.shape[1]}x{grid.shape[0]} px, {len(args.images)} image(s), "
        f"mask ratio {args.mask_ratio or model.config.mask_ratio})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
