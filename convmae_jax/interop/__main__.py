"""Command line: move weights between Orbax checkpoints and official PyTorch files.

  python -m convmae_jax.interop export --workdir W --out model.pth [--step N] [--overwrite]
  python -m convmae_jax.interop export --workdir W --out model.safetensors
  python -m convmae_jax.interop import --torch model.pth --out DIR [--model convmae_base]
      [--img_size 224] [--num_classes 1000] [--global_pool true|false] [--kwargs '{"...": ...}']
      [--no_strict] [--overwrite]

``export`` reads a training checkpoint (the latest step, or ``--step``) or a model-only checkpoint and
writes the official layout: ``.pth`` holds ``{"model": state_dict}`` like the released files,
``.safetensors`` the bare state dict (written without torch). ``import`` reads a ``.pth`` (with or
without the ``"model"`` wrapper) or ``.safetensors`` file, checks it against the model and writes a
model-only Orbax checkpoint (step 0, items ``model`` and ``meta``) that training and fine-tuning can
start from. Without ``--model`` the model is inferred from the tensors (family, sizes, depths,
``img_size``, ``num_classes``, ``global_pool``; heads from the size table).

Bad input is refused before anything is written; existing output is kept unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from convmae_jax.interop.files import (InteropError, infer_model, model_from_checkpoint,
                                       read_torch_file, safetensors_model_fields, suffix_kind,
                                       write_torch_file)


def cmd_export(args) -> int:
  from convmae_jax.interop.convert import to_torch_state_dict

  out = Path(args.out)
  suffix_kind(out)
  if out.exists() and not args.overwrite:
    raise InteropError(f"{out} exists; pass --overwrite to replace it")
  if out.exists() and not out.is_file():
    raise InteropError(f"{out} exists and is not a file")
  model, meta = model_from_checkpoint(args.workdir, args.step)
  sd = to_torch_state_dict(model)
  write_torch_file(sd, out, metadata={
    "model_name": str(meta.get("model_name")),
    "model_kwargs": json.dumps(meta.get("model_kwargs") or {}),
    "step": str(meta.get("step"))})
  n = sum(v.size for v in sd.values())
  print(f"exported {meta.get('model_name')} (step {meta.get('step')}): {len(sd)} tensors, "
          f"{n:,} values -> {out}")
  return 0


def _parse_bool(s: str) -> bool:
  v = s.strip().lower()
  if v in ("1", "true", "yes", "on"):
    return True
  if v in ("0", "false", "no", "off"):
    return False
  raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def cmd_import(args) -> int:
  from flax import nnx

  from convmae_jax import checkpoints, models
  from convmae_jax.interop.convert import load_torch_state_dict

  out = Path(args.out)
  steps = []
  ckpt_dir = Path(str(checkpoints.checkpoint_dir(out)))
  if ckpt_dir.is_dir():
    steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
  if steps and not args.overwrite:
    raise InteropError(f"{out} already holds a checkpoint (steps {steps}); pass --overwrite to replace it")
  if any(s != 0 for s in steps):
    raise InteropError(f"{out} holds training checkpoints (steps {steps}); import into an empty folder")
  if out.exists() and not out.is_dir():
    raise InteropError(f"{out} exists and is not a folder")

  sd = read_torch_file(args.torch, allow_pickle=args.allow_pickle)
  overrides: dict[str, Any] = {}
  if args.kwargs:
    try:
      overrides.update(json.loads(args.kwargs))
    except json.JSONDecodeError as e:
      raise InteropError(f"--kwargs is not valid JSON: {e}") from e
  for field in ("img_size", "num_classes", "global_pool", "norm_pix_loss", "mask_ratio",
                  "drop_path_rate"):
    value = getattr(args, field)
    if value is not None:
      overrides[field] = value
  stored_name, stored = None, {}
  if str(args.torch).lower().endswith(".safetensors"):
    # An export stores the model's name and every config field (norm_pix_loss, mask ratio,
    # sizes); the tensors alone cannot tell those.
    stored_name, stored = safetensors_model_fields(args.torch)
  if args.model:
    name, kwargs = args.model, ({**stored, **overrides} if args.model == stored_name else overrides)
  elif stored_name:
    name, kwargs = stored_name, {**stored, **overrides}
  else:
    name, kwargs = infer_model(sd)
    kwargs.update(overrides)
  try:
    models.config_for(name, **kwargs)
  except (TypeError, ValueError) as e:
    raise InteropError(f"bad model settings for {name}: {e}") from e
  model = models.create(name, rngs=nnx.Rngs(args.seed), **kwargs)
  try:
    report = load_torch_state_dict(model, sd, strict=not args.no_strict)
  except ValueError as e:
    raise InteropError(f"{args.torch}: {e}") from e
  meta = {"model_name": name, "model_kwargs": model.config.to_dict(), "step": 0,
      "source": os.path.abspath(args.torch), "import_report": {
        "loaded": len(report.loaded), "missing": report.missing,
        "unexpected": report.unexpected, "ignored": len(report.ignored)}}
  path = checkpoints.save_model(out, model, meta, step=0, overwrite=args.overwrite)
  print(f"imported {args.torch} as {name} {json.dumps(model.config.to_dict())}: {report}")
  print(f"wrote {path}")
  return 0


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m convmae_jax.interop",
                description="Convert ConvMAE/ConvViT weights between Orbax and PyTorch.")
  sub = p.add_subparsers(dest="command", required=True)

  e = sub.add_parser("export", help="Orbax checkpoint -> official .pth / .safetensors")
  e.add_argument("--workdir", required=True,
                   help="training workdir, its checkpoints/ folder, or an imported model folder")
  e.add_argument("--out", required=True, help="output file; .pth ({'model': sd}) or .safetensors")
  e.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  e.add_argument("--overwrite", action="store_true", help="replace an existing output file")
  e.set_defaults(func=cmd_export)

  i = sub.add_parser("import", help="official .pth / .safetensors -> Orbax model checkpoint")
  i.add_argument("--torch", required=True, help=".pth/.pt (with or without 'model') or .safetensors")
  i.add_argument("--out", required=True, help="output folder (a model-only checkpoint, step 0)")
  i.add_argument("--model", default=None,
                   help="registry name, e.g. convmae_base or convvit_base (default: inferred)")
  i.add_argument("--img_size", type=int, default=None)
  i.add_argument("--num_classes", type=int, default=None)
  i.add_argument("--global_pool", type=_parse_bool, default=None, metavar="true|false")
  i.add_argument("--norm_pix_loss", type=_parse_bool, default=None, metavar="true|false")
  i.add_argument("--mask_ratio", type=float, default=None)
  i.add_argument("--drop_path_rate", type=float, default=None)
  i.add_argument("--kwargs", default=None, help="further config fields as JSON")
  i.add_argument("--seed", type=int, default=0, help="init seed for keys absent from the file")
  i.add_argument("--no_strict", action="store_true",
                   help="allow missing/unexpected keys (shapes must still match)")
  i.add_argument("--allow_pickle", action="store_true",
                   help="torch.load with weights_only=False (only for files you trust)")
  i.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint in --out")
  i.set_defaults(func=cmd_import)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.func(args)
  except InteropError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
