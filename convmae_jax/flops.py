"""Counting the matrix work of a JAX function from its jaxpr (used by the benchmarks).

    from convmae_jax import flops
    n = flops.count(step_fn, params, opt_state, images, key)   # FLOPs of one call

The rule is the usual "model FLOPs" one: 2 FLOPs per multiply-accumulate of every ``dot_general``
and ``conv_general_dilated`` in the traced program (forward, backward and whatever else the function
does), found in every sub-jaxpr (jit, custom_vjp, checkpoint, cond, scan bodies times their trip
count). Elementwise work (norms, softmax, GELU, the optimizer) is not counted. Only shapes matter,
so nothing is computed: arguments may be ``jax.ShapeDtypeStruct``.

A depthwise conv written as shifted multiply-adds (``dwconv_impl="shift"``) has no conv op, so count
with ``dwconv_impl="lax"`` to include it; its share is under 1% of the ConvMAE step. Likewise cuDNN
attention (``attention_impl="cudnn"``, which ``"auto"`` picks on a GPU in bfloat16) is one custom
call without dot_general: count with ``attention_impl="explicit"`` (or ``"xla"``).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.extend import core as jax_core


def _dot_flops(eqn) -> int:
  lhs = eqn.invars[0].aval
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  out = eqn.outvars[0].aval
  contracted = math.prod(lhs.shape[d] for d in lhs_contract)
  return 2 * math.prod(out.shape) * contracted


def _conv_flops(eqn) -> int:
  rhs = eqn.invars[1].aval
  out = eqn.outvars[0].aval
  rhs_out_dim = eqn.params["dimension_numbers"].rhs_spec[0]
  # Each output element is one filter (the kernel slice of its output feature) against a window.
  per_output = math.prod(rhs.shape) // rhs.shape[rhs_out_dim]
  return 2 * math.prod(out.shape) * per_output


def _sub_jaxprs(eqn):
  """(jaxpr, multiplicity) of every sub-program of an equation."""
  mult = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
  found = []
  for value in eqn.params.values():
    items = value if isinstance(value, (tuple, list)) else (value,)
    for item in items:
      if isinstance(item, jax_core.ClosedJaxpr):
        found.append((item.jaxpr, mult))
      elif isinstance(item, jax_core.Jaxpr):
        found.append((item, mult))
  if eqn.primitive.name == "cond":
    # One branch runs: count the most expensive.
    branches = [(j, m) for j, m in found]
    return [max(branches, key=lambda jm: jaxpr_flops(jm[0]))] if branches else []
  return found


def jaxpr_flops(jaxpr) -> int:
  """Matmul + conv FLOPs of a jaxpr (see the module docstring)."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      total += _conv_flops(eqn)
    else:
      for sub, mult in _sub_jaxprs(eqn):
        total += mult * jaxpr_flops(sub)
  return total


def count(fn: Callable[..., Any], *args, **kwargs) -> int:
  """Matmul + conv FLOPs of one call of ``fn(*args, **kwargs)``, from its traced program."""
  closed = jax.make_jaxpr(fn)(*args, **kwargs)
  return jaxpr_flops(closed.jaxpr)
