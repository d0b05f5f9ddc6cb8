"""All sharding decisions of the trainer, in one place.

Mesh: ``jax.make_mesh((data, fsdp), ("data", "fsdp"))`` with Auto axes (GSPMD propagation, the
classic pjit behaviour). The batch is split over both axes together; with ``fsdp > 1`` every parameter
(and its AdamW moments) is split along ``fsdp`` on its largest dimension that divides evenly, and
replicated over ``data``. Everything else (frozen position embeddings, RNG state, scalars) is
replicated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from convmae_jax.train.errors import ConfigError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def resolve_mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
  """Fills in a -1 axis with the rest of the devices; raises ValueError on any mismatch."""
  data, fsdp = int(data), int(fsdp)
  for name, value in (("mesh.data", data), ("mesh.fsdp", fsdp)):
    if value == 0 or value < -1:
      raise ConfigError(f"{name}={value} is not accepted: use a positive axis size or -1 (= the rest).")
  if data == -1 and fsdp == -1:
    raise ConfigError("mesh.data and mesh.fsdp are both -1; at most one axis may take 'the rest'.")
  if data == -1 or fsdp == -1:
    known = fsdp if data == -1 else data
    if num_devices % known:
      raise ConfigError(
          f"mesh {'fsdp' if data == -1 else 'data'}={known} does not divide the {num_devices} devices; "
          f"accepted: a divisor of {num_devices} ({_divisors(num_devices)}).")
    rest = num_devices // known
    data, fsdp = (rest, fsdp) if data == -1 else (data, rest)
  if data * fsdp != num_devices:
    raise ConfigError(
        f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but {num_devices} are present; "
        f"the product must equal {num_devices} (use -1 for one axis to take the rest).")
  return data, fsdp


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def make_mesh(data: int, fsdp: int) -> Mesh:
  """The 2-D device mesh (data, fsdp) over all devices, with Auto axis types."""
  data, fsdp = resolve_mesh_shape(data, fsdp, jax.device_count())
  return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data and fsdp together."""
  return NamedSharding(mesh, P(BATCH_AXES))


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """The rule: split the largest dimension divisible by ``fsdp`` along 'fsdp' (ties: the later
  dimension, usually the output features); replicate when none divides or fsdp == 1."""
  if fsdp <= 1 or not shape:
    return P()
  candidates = [d for d in range(len(shape)) if shape[d] % fsdp == 0 and shape[d] >= fsdp]
  if not candidates:
    return P()
  dim = max(candidates, key=lambda d: (shape[d], d))
  spec = [None] * len(shape)
  spec[dim] = "fsdp"
  return P(*spec)


def param_shardings(abstract_params: Any, mesh: Mesh) -> Any:
  """Shardings for a (possibly abstract) tree of parameters, following :func:`param_spec`."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp)),
                      abstract_params)


def replicated_shardings(tree: Any, mesh: Mesh) -> Any:
  return jax.tree.map(lambda _: replicated(mesh), tree)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Any, p_shardings: Any,
                        mesh: Mesh) -> Any:
  """Optimizer-state shardings mirroring the parameters' (moments) and replicating the rest (count).

  Plain ``jax.jit(tx.init)`` would replicate the moments and put ``count`` on one device
  on an Auto mesh, so the shardings are derived explicitly.
  """
  abstract_state = jax.eval_shape(tx.init, abstract_params)
  return optax.tree_map_params(tx, lambda _, s: s, abstract_state, p_shardings,
                               transform_non_params=lambda _: replicated(mesh))


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying shardings: the restore target for Orbax."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def local_batch_size(global_batch_size: int) -> int:
  """Rows this process feeds: the global batch split evenly over processes."""
  return global_batch_size // jax.process_count()


def to_global_array(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Assembles the globally sharded batch from this process's rows."""
  return jax.make_array_from_process_local_data(sharding, local)


@dataclasses.dataclass
class StateShardings:
  """Shardings of a split model (params / rest), its optimizer state, the batch and scalars."""
  mesh: jax.sharding.Mesh
  params: Any
  rest: Any
  opt_state: Any
  batch: jax.sharding.NamedSharding
  replicated: jax.sharding.NamedSharding


def state_shardings(mesh, abstract_params, abstract_rest, tx) -> StateShardings:
  """Parameters by ``param_shardings``, their optimizer state alike, the rest replicated."""
  param_sh = param_shardings(abstract_params, mesh)
  return StateShardings(
      mesh=mesh, params=param_sh,
      rest=replicated_shardings(abstract_rest, mesh),
      opt_state=opt_state_shardings(tx, abstract_params, param_sh, mesh),
      batch=batch_sharding(mesh), replicated=replicated(mesh))
