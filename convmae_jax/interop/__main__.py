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
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

PTH_SUFFIXES = (".pth", ".pt", ".bin")
ST_SUFFIXES = (".safetensors",)


class CLIError(Exception):
    """A user error: printed without a traceback, exit status 2."""


# ------------------------------------------------------------------------------------------------
# files

def _suffix_kind(path: Path) -> str:
    suf = path.suffix.lower()
    if suf in PTH_SUFFIXES:
        return "pth"
    if suf in ST_SUFFIXES:
        return "safetensors"
    raise CLIError(f"{path}: unknown file type {suf!r}; use .pth (or .pt) or .safetensors")


def read_torch_file(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, Any]:
    """Reads a ``.pth``/``.pt`` or ``.safetensors`` file and returns the flat state dict of numpy arrays
    (``"model"`` / ``"state_dict"`` wrappers and a ``module.`` prefix are removed)."""
    from convmae_jax.interop.convert import _to_numpy, unwrap_state_dict

    path = Path(path)
    kind = _suffix_kind(path)
    if not path.is_file():
        raise CLIError(f"{path}: no such file")
    if kind == "safetensors":
        from safetensors.numpy import load_file
        try:
            sd = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - report any parse error as bad input
            raise CLIError(f"{path}: not a readable safetensors file ({e})") from e
    else:
        import argparse as _argparse

        import torch
        try:
            if allow_pickle:
                obj = torch.load(str(path), map_location="cpu", weights_only=False)
            else:
                # Official training checkpoints also carry an argparse.Namespace ("args").
                with torch.serialization.safe_globals([_argparse.Namespace]):
                    obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            hint = "" if allow_pickle else (
                " If you trust the file and it holds other Python objects, pass --allow_pickle.")
            raise CLIError(f"{path}: could not be read by torch.load ({e}).{hint}") from e
        try:
            sd = unwrap_state_dict(obj)
        except TypeError as e:
            raise CLIError(f"{path}: {e}") from e
    try:
        sd = unwrap_state_dict(sd)
    except TypeError as e:
        raise CLIError(f"{path}: {e}") from e
    out = {}
    for k, v in sd.items():
        if not (hasattr(v, "shape") and hasattr(v, "dtype")):
            raise CLIError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = _to_numpy(v)
    return out


def _atomic_write(out: Path, write) -> None:
    """write(tmp_path) then rename onto ``out`` (never leaves a half-written output behind)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=str(out.parent))
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600; give the file the permissions any new file gets (umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_torch_file(sd: dict, out: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> None:
    """``.pth``: ``torch.save({"model": sd})``; ``.safetensors``: the bare state dict."""
    out = Path(out)
    kind = _suffix_kind(out)
    if kind == "safetensors":
        from safetensors.numpy import save_file
        meta = {"format": "pt", **(metadata or {})}
        _atomic_write(out, lambda tmp: save_file(sd, tmp, metadata=meta))
    else:
        import torch
        tsd = {k: torch.from_numpy(v) for k, v in sd.items()}
        _atomic_write(out, lambda tmp: torch.save({"model": tsd}, tmp))


# ------------------------------------------------------------------------------------------------
# model inference from a state dict

def _count(sd: dict, prefix: str) -> int:
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    ids = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
    return max(ids) + 1 if ids else 0


def infer_model(sd: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(registry name, config overrides) that fit an official-layout state dict.

    Sizes, depths, mlp ratios, patch sizes, in_chans, img_size, decoder sizes, num_classes and
    global_pool are read off the tensor shapes; attention heads are not visible in the weights and
    come from the size-table entry with the same widths and depths (else: error, pass --model).
    """
    from convmae_jax.models import config as mcfg

    def shape(key):
        if key not in sd:
            raise CLIError(f"cannot infer the model: key {key!r} is missing; pass --model")
        return tuple(sd[key].shape)

    family = "convmae" if any(k.startswith("decoder_embed.") for k in sd) else "convvit"
    pe = [shape(f"patch_embed{i}.proj.weight") for i in (1, 2, 3)]
    embed_dims = tuple(int(s[0]) for s in pe)
    patch_sizes = tuple(int(s[2]) for s in pe)
    in_chans = int(pe[0][1])
    depths = tuple(_count(sd, f"blocks{i}") for i in (1, 2, 3))
    if min(depths) < 1:
        raise CLIError(f"cannot infer the model: block depths {depths}; pass --model")
    mlp_ratios = tuple(shape(f"blocks{i}.0.mlp.fc1.weight")[0] / embed_dims[i - 1] for i in (1, 2, 3))
    length = shape("pos_embed")[1]
    grid = int(round(math.sqrt(length)))
    kw: dict[str, Any] = dict(img_size=grid * math.prod(patch_sizes), in_chans=in_chans,
                              patch_sizes=patch_sizes, embed_dims=embed_dims, depths=depths,
                              mlp_ratios=mlp_ratios)
    size = next((s for s, v in mcfg.SIZES.items()
                 if tuple(v["embed_dims"]) == embed_dims and tuple(v["depths"]) == depths), None)
    if size is None:
        size = next((s for s, v in mcfg.SIZES.items() if tuple(v["embed_dims"]) == embed_dims), None)
    if size is None:
        raise CLIError(f"cannot infer the number of attention heads for embed_dims {embed_dims}, depths "
                       f"{depths} (no size-table entry has them); pass --model and --kwargs "
                       "'{\"num_heads\": H, ...}'")
    if family == "convmae":
        dd = shape("decoder_embed.weight")[0]
        kw.update(decoder_embed_dim=int(dd), decoder_depth=_count(sd, "decoder_blocks"))
        if kw["decoder_depth"]:
            ratio = shape("decoder_blocks.0.mlp.fc1.weight")[0] / dd
            if ratio != mlp_ratios[0]:
                kw["decoder_mlp_ratio"] = ratio
        table_dec = mcfg.DECODER_SIZES[size]
        if table_dec["decoder_embed_dim"] != dd:
            raise CLIError(f"cannot infer decoder heads for decoder width {dd}; pass --model and "
                           "--kwargs '{\"decoder_num_heads\": H}'")
    else:
        if "head.weight" in sd:
            kw["num_classes"] = int(shape("head.weight")[0])
        kw["global_pool"] = "norm.weight" not in sd or "fc_norm.weight" in sd
    return f"{family}_{size}", kw


# ------------------------------------------------------------------------------------------------
# commands

def _model_from_checkpoint(workdir: str, step: int | None):
    """(model with the checkpoint's parameters, metadata). The model is built abstractly (no init)."""
    from flax import nnx

    from convmae_jax import checkpoints, models
    from convmae_jax.interop.convert import _flatten, _param_filter, _unflatten

    try:
        pure, meta = checkpoints.load_model_state(workdir, step=step)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from e
    name, kwargs = meta.get("model_name"), meta.get("model_kwargs") or {}
    if not name:
        raise CLIError(f"{workdir}: checkpoint metadata has no model_name ({meta})")
    abstract = nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0), **kwargs))
    params = nnx.state(abstract, _param_filter())
    want = _flatten(nnx.to_pure_dict(params))
    have = _flatten(pure)
    missing = [p for p in want if p not in have]
    bad = [f"{'/'.join(map(str, p))}: {tuple(have[p].shape)} vs {tuple(v.shape)}"
           for p, v in want.items() if p in have and tuple(have[p].shape) != tuple(v.shape)]
    if missing or bad:
        raise CLIError(f"{workdir}: checkpoint does not fit {name} {kwargs}: missing "
                       f"{['/'.join(map(str, p)) for p in missing[:10]]}, wrong shapes {bad[:10]}")
    nnx.replace_by_pure_dict(params, _unflatten({p: have[p] for p in want}))
    nnx.update(abstract, params)
    return abstract, meta


def cmd_export(args) -> int:
    from convmae_jax.interop.convert import to_torch_state_dict

    out = Path(args.out)
    _suffix_kind(out)
    if out.exists() and not args.overwrite:
        raise CLIError(f"{out} exists; pass --overwrite to replace it")
    if out.exists() and not out.is_file():
        raise CLIError(f"{out} exists and is not a file")
    model, meta = _model_from_checkpoint(args.workdir, args.step)
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
        raise CLIError(f"{out} already holds a checkpoint (steps {steps}); pass --overwrite to replace it")
    if any(s != 0 for s in steps):
        raise CLIError(f"{out} holds training checkpoints (steps {steps}); import into an empty folder")
    if out.exists() and not out.is_dir():
        raise CLIError(f"{out} exists and is not a folder")

    sd = read_torch_file(args.torch, allow_pickle=args.allow_pickle)
    overrides: dict[str, Any] = {}
    if args.kwargs:
        try:
            overrides.update(json.loads(args.kwargs))
        except json.JSONDecodeError as e:
            raise CLIError(f"--kwargs is not valid JSON: {e}") from e
    for field in ("img_size", "num_classes", "global_pool", "norm_pix_loss", "mask_ratio",
                  "drop_path_rate"):
        value = getattr(args, field)
        if value is not None:
            overrides[field] = value
    stored_name, stored = None, {}
    if str(args.torch).lower().endswith(".safetensors"):
        # An export stores the model's name and every config field (norm_pix_loss, mask ratio,
        # sizes); the tensors alone cannot tell those.
        from convmae_jax.api import safetensors_model_fields
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
        raise CLIError(f"bad model settings for {name}: {e}") from e
    model = models.create(name, rngs=nnx.Rngs(args.seed), **kwargs)
    try:
        report = load_torch_state_dict(model, sd, strict=not args.no_strict)
    except ValueError as e:
        raise CLIError(f"{args.torch}: {e}") from e
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
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
