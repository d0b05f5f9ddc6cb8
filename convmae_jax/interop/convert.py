"""Conversion between the NNX model state and the official PyTorch state-dict layout.

No torch here: state dicts are ``{official key: numpy array}`` (torch tensors are accepted as input
and converted with ``.numpy()``), so exporting to ``.safetensors`` works without torch installed.

Naming: an NNX attribute path ``('blocks3', 0, 'attn', 'qkv', 'kernel')`` becomes the key
``blocks3.0.attn.qkv.weight``; ``kernel``/``scale`` -> ``weight``, ``bias`` stays, the variables
``pos_embed``, ``mask_token`` and ``decoder_pos_embed`` keep their names. Layouts:

| NNX variable                                   | PyTorch                          | transform            |
|------------------------------------------------|----------------------------------|----------------------|
| conv kernel HWIO (kh, kw, I, O), depthwise (5,5,1,C) | OIHW (O, I, kh, kw), (C,1,5,5) | transpose (3,2,0,1) |
| 1x1 conv of a CBlock (conv1, conv2, mlp.fc1/fc2): Dense (I, O) | (O, I, 1, 1)      | ``k.T[:, :, None, None]`` |
| Linear kernel (I, O)                           | (O, I)                           | ``k.T``              |
| LayerNorm scale / any bias / pos embeds / mask_token | same                       | none                 |

The fused qkv projection has the same [q|k|v], head-major channel layout on both sides.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

__all__ = [
    "LoadReport",
    "to_torch_state_dict",
    "load_torch_state_dict",
    "unwrap_state_dict",
    "torch_key",
    "PRETRAIN_ONLY_PREFIXES",
    "CLASSIFIER_ONLY_PREFIXES",
]

# Top-level names that exist only in the pretraining model / only in the classifier.
PRETRAIN_ONLY_PREFIXES = ("mask_token", "decoder_pos_embed", "stage1_output_decode",
                          "stage2_output_decode", "norm", "decoder_embed", "decoder_blocks",
                          "decoder_norm", "decoder_pred")
CLASSIFIER_ONLY_PREFIXES = ("fc_norm", "head")
# CBlock lists: their Dense layers are 1x1 Conv2d in PyTorch.
_CONV_BLOCK_LISTS = ("blocks1", "blocks2")
_SHOW = 10  # how many offending keys an error message names per category (at least)

# Ordering of the official state dict (registration order of the official modules): top-level
# names, then names inside modules.
_TOP_RANK = {name: i for i, name in enumerate([
    "pos_embed", "cls_token", "mask_token", "decoder_pos_embed",
    "patch_embed1", "patch_embed2", "patch_embed3", "patch_embed4",
    "stage1_output_decode", "stage2_output_decode",
    "blocks1", "blocks2", "blocks3", "norm", "fc_norm",
    "decoder_embed", "decoder_blocks", "decoder_norm", "decoder_pred", "head"])}
_INNER_RANK = {name: i for i, name in enumerate([
    "qkv", "proj", "norm1", "conv1", "conv2", "attn", "norm2", "mlp", "fc1", "fc2", "norm",
    "weight", "bias"])}

# ------------------------------------------------------------------------------------------------
# helpers

def _param_filter():
    from flax import nnx
    from convmae_jax.models.layers import FrozenPosEmbed
    return nnx.Any(nnx.Param, FrozenPosEmbed)


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    out: dict[tuple, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def torch_key(path: tuple) -> str:
    """NNX attribute path -> official state-dict key."""
    *mods, leaf = (str(p) for p in path)
    if leaf in ("kernel", "scale"):
        leaf = "weight"
    return ".".join(mods + [leaf])


def _is_conv_block_dense(path: tuple) -> bool:
    return str(path[0]) in _CONV_BLOCK_LISTS and str(path[-1]) == "kernel"


def _to_torch_layout(path: tuple, a: np.ndarray) -> np.ndarray:
    if str(path[-1]) != "kernel":
        return a
    if a.ndim == 4:  # HWIO -> OIHW (depthwise (5,5,1,C) -> (C,1,5,5))
        return a.transpose(3, 2, 0, 1)
    if a.ndim == 2:
        if _is_conv_block_dense(path):  # Dense (I,O) -> 1x1 conv (O,I,1,1)
            return a.T[:, :, None, None]
        return a.T  # Linear (I,O) -> (O,I)
    raise ValueError(f"unexpected kernel rank {a.ndim} at {path}")


def _from_torch_layout(path: tuple, a: np.ndarray, jax_ndim: int) -> np.ndarray:
    if str(path[-1]) != "kernel":
        return a
    if jax_ndim == 4:
        return a.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if a.ndim == 4:  # 1x1 conv (O,I,1,1) -> Dense (I,O)
        return a[:, :, 0, 0].T
    return a.T


def _torch_shape(path: tuple, shape: tuple) -> tuple:
    return tuple(_to_torch_layout(path, np.empty(shape, dtype=np.bool_)).shape)


def _sort_key(key: str):
    out = []
    for i, part in enumerate(key.split(".")):
        rank = _TOP_RANK if i == 0 else _INNER_RANK
        if part.isdigit():
            out.append((1, int(part), ""))
        else:
            out.append((0, rank.get(part, len(rank)), part))
    return out


def _to_numpy(v: Any) -> np.ndarray:
    """numpy / jax / torch (any float dtype, any device) -> numpy array."""
    if hasattr(v, "detach") and hasattr(v, "cpu"):  # torch.Tensor, without importing torch
        v = v.detach().cpu()
        if str(v.dtype) in ("torch.bfloat16", "torch.float16"):  # numpy has no bfloat16
            v = v.float()
        return v.numpy()
    return np.asarray(v)


def _param_paths(model) -> dict[tuple, Any]:
    """{path: jax array} for every nnx.Param and FrozenPosEmbed of ``model`` (no RNG state)."""
    from flax import nnx
    return _flatten(nnx.to_pure_dict(nnx.state(model, _param_filter())))


def _key_map(model) -> dict[str, tuple]:
    """{official key: (nnx path, jax shape, torch shape)} in official order."""
    out = {}
    for path, v in _param_paths(model).items():
        shape = tuple(v.shape)
        out[torch_key(path)] = (path, shape, _torch_shape(path, shape))
    return {k: out[k] for k in sorted(out, key=_sort_key)}


def unwrap_state_dict(obj: Any) -> dict[str, Any]:
    """Accepts an official checkpoint (``{"model": sd, ...}``), ``{"state_dict": sd}`` or a plain
    state dict, and strips a DistributedDataParallel ``module.`` prefix present on every key."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state dict (a mapping of names to arrays), got {type(obj).__name__}")
    for wrapper in ("model", "state_dict"):
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    sd = dict(obj)
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    bad = [k for k, v in sd.items() if not isinstance(k, str) or isinstance(v, Mapping)]
    if bad:
        raise TypeError(f"not a flat state dict: entries {bad[:_SHOW]} are not name -> array")
    return sd


# ------------------------------------------------------------------------------------------------
# public API

def to_torch_state_dict(model) -> dict[str, np.ndarray]:
    """Every parameter (and frozen position embedding) of ``model`` under its official key, in the
    official layout and order. Values are float32 numpy arrays (fresh copies)."""
    flat = _param_paths(model)
    out = {}
    for key, (path, _, _) in _key_map(model).items():
        a = np.asarray(flat[path])
        out[key] = np.ascontiguousarray(_to_torch_layout(path, a).astype(np.float32, copy=True))
    return out


@dataclasses.dataclass
class LoadReport:
    """What :func:`load_torch_state_dict` did.

    loaded: keys copied into the model. missing: model keys absent from the state dict (their
    values are left unchanged). unexpected: state-dict keys the model has no place for (only with
    strict=False). ignored: pretraining-only keys (decoder, mask token, stage decodes, ``norm``)
    dropped on purpose when a pretraining state dict is loaded into a classifier.
    """
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    ignored: list[str]

    def __str__(self) -> str:
        return (f"loaded {len(self.loaded)} keys; missing {len(self.missing)} {self.missing[:_SHOW]}; "
                f"unexpected {len(self.unexpected)} {self.unexpected[:_SHOW]}; ignored "
                f"{len(self.ignored)} pretraining-only keys")


def _top(key: str) -> str:
    return key.split(".", 1)[0]


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return f"{shown}, ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else shown


def load_torch_state_dict(model, state_dict: Mapping[str, Any], *, strict: bool = True) -> LoadReport:
    """Copies an official-layout state dict into ``model`` in place.

    Checks everything first and changes nothing if it raises ``ValueError`` (which names the first
    missing, unexpected and wrongly-shaped keys). Shapes must always match. With ``strict`` every
    model key must be present and no unknown key may appear, with one exception that mirrors the
    official fine-tuning: a pretraining state dict loaded into a classifier takes the encoder,
    drops the pretraining-only keys (reported as ``ignored``) and leaves the classifier-only
    ``fc_norm.*`` / ``head.*`` as they are (reported as ``missing``).

    ``state_dict`` values may be numpy arrays, jax arrays or torch tensors; a ``{"model": sd}``
    wrapper is accepted.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    sd = unwrap_state_dict(state_dict)
    kmap = _key_map(model)
    is_classifier = "head.weight" in kmap and "decoder_embed.weight" not in kmap
    from_pretraining = any(_top(k) in ("mask_token", "decoder_embed", "decoder_blocks",
                                       "decoder_pred") for k in sd)
    encoder_transfer = is_classifier and from_pretraining

    missing = [k for k in kmap if k not in sd]
    unexpected, ignored = [], []
    for k in sd:
        if k in kmap:
            continue
        if encoder_transfer and _top(k) in PRETRAIN_ONLY_PREFIXES:
            ignored.append(k)
        else:
            unexpected.append(k)
    wrong_shape = []
    for k, (path, _, tshape) in kmap.items():
        if k in sd:
            shape = tuple(np.shape(sd[k]))
            if shape != tshape:
                wrong_shape.append(f"{k}: got {shape}, model expects {tshape}")

    errors = []
    if strict:
        bad_missing = [k for k in missing
                       if not (encoder_transfer and _top(k) in CLASSIFIER_ONLY_PREFIXES)]
        if bad_missing:
            errors.append(f"{len(bad_missing)} missing key(s): {_names(bad_missing)}")
        if unexpected:
            errors.append(f"{len(unexpected)} unexpected key(s): {_names(unexpected)}")
    if wrong_shape:
        errors.append(f"{len(wrong_shape)} key(s) with the wrong shape: {_names(wrong_shape)}")
    if errors:
        raise ValueError("state dict does not fit the model "
                         f"({type(model).__name__}): " + "; ".join(errors))

    # Convert everything before touching the model.
    state = nnx.state(model, _param_filter())
    flat_old = _flatten(nnx.to_pure_dict(state))
    new_flat = {}
    loaded = []
    for k, (path, jshape, _) in kmap.items():
        old = flat_old[path]
        if k not in sd:
            new_flat[path] = old
            continue
        a = _to_numpy(sd[k])
        if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
            raise ValueError(f"{k}: expected a floating-point array, got dtype {a.dtype}")
        a = _from_torch_layout(path, a, len(jshape))
        new = jnp.asarray(np.ascontiguousarray(a), dtype=old.dtype)
        sharding = getattr(old, "sharding", None)
        new_flat[path] = jax.device_put(new, sharding) if sharding is not None else new
        loaded.append(k)
    nnx.replace_by_pure_dict(state, _unflatten(new_flat))
    nnx.update(model, state)
    return LoadReport(loaded=loaded, missing=missing, unexpected=unexpected, ignored=ignored)
