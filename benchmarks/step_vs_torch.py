"""The ConvMAE pretraining step in JAX beside the PyTorch twin, same model, batch, size and device.

    python benchmarks/step_vs_torch.py --model convmae_base --batch 8                 # CPU, float32
    python benchmarks/step_vs_torch.py --model convmae_base --batch 256 --dtype bfloat16 \
        --conv_impl visible,dense --dwconv_impl lax,shift --remat off,on              # one GPU
    python benchmarks/step_vs_torch.py --model convmae_base --batch 128 --dtype bfloat16 \
        --attention_impl explicit,xla,cudnn                                          # attention

Step = forward + backward + AdamW (0.9, 0.95, wd 0.05) at mask ratio 0.75 with the normalized-pixel
loss, on random images, as the trainer runs it. The JAX variants (every combination of the comma
lists) and the twin run in turn, A B C A B C ..., so drift of clocks or load hits all alike; each
timing covers ``--inner`` steps ended by a device sync, and the median over ``--steps`` timings is
reported. On a GPU the twin runs under ``torch.autocast`` (bfloat16 by default, ``--torch_autocast
float16`` adds the official GradScaler) with cuDNN autotuning, as the official code trains; on a
CPU it runs under ``torch.autocast("cpu", dtype=torch.bfloat16)`` when ``--dtype bfloat16`` (the
comparison for CPUs with AVX-512-BF16 or AMX), in float32 otherwise. JAX computes in ``--dtype``
with float32 parameters.

Prints one JSON line per side. FLOPs are matmul + conv FLOPs counted from the step's own program
(``convmae_jax.flops``): ``flops_executed`` is what that variant computes, ``flops_dense_equiv``
what the official formulation (dense conv stages) computes for the same step, i.e. the work the
twin does. ``tflops_*`` divide them by the step time; ``mfu_*`` divide those by the matmul rate
measured in this run on this device (``matmul_peak_tflops``: a large square product in ``--dtype``)
and by the datasheet peak where the device is known. Memory: JAX's compiled step (arguments +
outputs + temporaries - donated) and, on a GPU, each side's peak allocation.

``--attention_impl`` picks how the attention layers are computed (``attention_impl`` of the model:
explicit matmuls, ``jax.nn.dot_product_attention`` with its XLA or cuDNN implementation, or auto);
each line names the requested value and, as ``attention_impl_resolved``, what it resolves to for
the encoder's attention. FLOPs are always counted on the explicit form (a cuDNN call hides its
matmuls), so every attention variant is credited with the same work.

``--complementary on`` adds FastConvMAE's complementary masks (``complementary_masks=True``): each
image gives 1/(1 - mask_ratio) masked views per step (four at 0.75), so besides images/s the line
gives ``targets_per_s`` (masked views reconstructed with their loss per second; one per image
otherwise) and ``flops_dense_equiv`` is what the official formulation spends on that many views.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Both frameworks share the GPU: JAX takes memory as it needs it instead of 75% up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import hostinfo  # noqa: E402
from convmae_jax import flops as flops_lib  # noqa: E402
from convmae_jax import models  # noqa: E402

# Dense (no sparsity) datasheet peaks in TFLOP/s, by a substring of the device kind.
DATASHEET_TFLOPS = {
    "H100 PCIe": {"bfloat16": 756.0, "float32": 51.2},
    "H100": {"bfloat16": 989.4, "float32": 66.9},
    "H200": {"bfloat16": 989.4, "float32": 66.9},
    "A100": {"bfloat16": 312.0, "float32": 19.5},
    "TPU v4": {"bfloat16": 275.0},
    "TPU v5 lite": {"bfloat16": 197.0},
    "TPU v5e": {"bfloat16": 197.0},
    "TPU v5p": {"bfloat16": 459.0},
    "TPU v6": {"bfloat16": 918.0},
}


def datasheet_peak(device_kind: str, dtype: str) -> float | None:
  for key, peaks in DATASHEET_TFLOPS.items():
    if key.lower() in device_kind.lower():
      return peaks.get(dtype)
  return None


def sig(x: float, digits: int = 4) -> float:
  """x to `digits` significant digits (CPU rates are small numbers of TFLOP/s)."""
  return float(f"{x:.{digits}g}")


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def measure_matmul_tflops(dtype: str, n: int | None = None, reps: int = 10) -> float:
  """Rate of an n×n×n product on the default device, the best of three timings of `reps` products,
  asked for as the model asks (`layers.matmul`: on a CPU, bfloat16 operands into a float32 result
  rounded to bfloat16, which XLA:CPU runs in bfloat16 kernels)."""
  n = n or (8192 if jax.default_backend() != "cpu" else 2048)
  dt = jnp.dtype(dtype)
  a = jax.random.normal(jax.random.key(0), (n, n), dt)
  b = jax.random.normal(jax.random.key(1), (n, n), dt)

  product = jax.jit(models.layers.matmul)
  product(a, b).block_until_ready()
  best = float("inf")
  for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = product(a, b)
    out.block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 * reps / best / 1e12


# ------------------------------------------------------------------------------------------------
# The two sides.
# ------------------------------------------------------------------------------------------------
def make_step(args, conv_impl: str, dwconv_impl: str, remat: bool, complementary: bool = False,
              attention_impl: str = "auto"):
  """(step, params, opt_state, num_patches): the trainer's pretraining step for one variant."""
  model = models.create(args.model, rngs=nnx.Rngs(0), img_size=args.img_size, dtype=args.dtype,
                        dwconv_impl=dwconv_impl, conv_impl=conv_impl,
                        complementary_masks=complementary, attention_impl=attention_impl)
  num_patches = model.num_patches
  tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.05)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p, images, noise):
    return nnx.merge(graphdef, p, rest)(images, noise=noise)[0]

  if remat:
    loss_fn = jax.checkpoint(loss_fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)

  def step(p, opt_state, images, key):
    noise = jax.random.uniform(key, (images.shape[0], num_patches))
    loss, grads = jax.value_and_grad(loss_fn)(p, images, noise)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  return step, params, tx.init(params), num_patches


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


_FLOPS_CACHE: dict = {}


def step_flops(args, conv_impl: str, remat: bool, complementary: bool = False) -> int:
  """Matmul + conv FLOPs of one step, counted on the step's program with the depthwise conv as a
  conv op (so "shift" variants count the same work they do as multiply-adds) and the attention
  written as matmuls (cuDNN attention is one custom call)."""
  key = (conv_impl, remat, complementary)
  if key not in _FLOPS_CACHE:
    step, params, opt_state, _ = make_step(args, conv_impl, "lax", remat, complementary,
                                           attention_impl="explicit")
    images = jax.ShapeDtypeStruct((args.batch, args.img_size, args.img_size, 3), jnp.float32)
    _FLOPS_CACHE[key] = flops_lib.count(step, abstract(params), abstract(opt_state), images,
                                        jax.random.key(0))
    del params, opt_state
    gc.collect()
  return _FLOPS_CACHE[key]


def encoder_attention_impl(args, attention_impl: str) -> str:
  """What `attention_impl` resolves to for the encoder's attention of this model, size and dtype
  (the visible tokens, no bias) on the default backend; ValueError where it cannot run."""
  cfg = models.config_for(args.model, img_size=args.img_size)
  return models.transformer.resolve_attention_impl(
      attention_impl, dtype=jnp.dtype(args.dtype), head_dim=cfg.embed_dims[2] // cfg.num_heads,
      length=models.num_visible(cfg.num_patches, cfg.mask_ratio), has_bias=False)


class JaxSide:
  """One JAX variant's compiled step and its state; `run(k)` does k steps and syncs."""

  def __init__(self, args, conv_impl: str, dwconv_impl: str, remat: bool, complementary: bool,
               attention_impl: str = "auto"):
    self.name = (f"jax conv_impl={conv_impl} dwconv_impl={dwconv_impl} remat={'on' if remat else 'off'}"
                 f" complementary={'on' if complementary else 'off'}"
                 f" attention_impl={attention_impl}")
    self.groups = (models.config_for(args.model, img_size=args.img_size,
                                     complementary_masks=True).num_groups if complementary else 1)
    self.meta = dict(side="jax", conv_impl=conv_impl, dwconv_impl=dwconv_impl,
                     remat="on" if remat else "off", complementary="on" if complementary else "off",
                     dtype=args.dtype, attention_impl=attention_impl,
                     attention_impl_resolved=encoder_attention_impl(args, attention_impl))
    self.flops_executed = step_flops(args, conv_impl, remat, complementary)
    step, params, opt_state, _ = make_step(args, conv_impl, dwconv_impl, remat, complementary,
                                           attention_impl)
    images = jax.random.normal(jax.random.key(0), (args.batch, args.img_size, args.img_size, 3))
    t0 = time.perf_counter()
    self.compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
        params, opt_state, images, jax.random.key(0)).compile()
    self.compile_s = time.perf_counter() - t0
    self.memory_bytes = None
    try:
      ma = self.compiled.memory_analysis()
      self.memory_bytes = int(ma.argument_size_in_bytes + ma.output_size_in_bytes
                              - ma.alias_size_in_bytes + ma.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 -- not every backend reports it
      pass
    self.state = [params, opt_state]
    self.images = images
    self.i = 0
    self.loss = None

  def run(self, k: int) -> float:
    t0 = time.perf_counter()
    for _ in range(k):
      self.state[0], self.state[1], self.loss = self.compiled(
          self.state[0], self.state[1], self.images, jax.random.key(self.i))
      self.i += 1
    self.loss.block_until_ready()
    return (time.perf_counter() - t0) / k


def torch_autocast(args, cuda: bool) -> str:
  """The twin's autocast dtype name ("off" for none) for ``--torch_autocast`` on this device."""
  if args.torch_autocast != "auto":
    return args.torch_autocast
  if cuda:
    return "bfloat16"
  return "bfloat16" if args.dtype == "bfloat16" else "off"


class TorchSide:
  """The PyTorch twin (official formulation) with AdamW; autocast on a GPU."""

  def __init__(self, args):
    import torch

    from convmae_jax import interop
    self.torch = torch
    self.cuda = on_gpu() and torch.cuda.is_available()
    self.device = torch.device("cuda" if self.cuda else "cpu")
    torch.manual_seed(0)
    self.model = interop.torch_model(args.model, img_size=args.img_size).to(self.device)
    self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4,
                                 betas=(0.9, 0.95), weight_decay=0.05)
    self.images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=self.device)
    self.length = (args.img_size // 16) ** 2
    self.autocast = torch_autocast(args, self.cuda)
    self.scaler = None
    if self.autocast == "float16":
      self.scaler = torch.amp.GradScaler("cuda")
    if self.cuda:
      torch.backends.cudnn.benchmark = True
      torch.cuda.reset_peak_memory_stats()
    self.name = f"torch {torch.__version__} autocast={self.autocast}"
    self.groups = 1
    self.meta = dict(side="torch", framework=f"torch {torch.__version__}", autocast=self.autocast,
                     threads=torch.get_num_threads())
    self.loss = None

  def _step(self):
    torch = self.torch
    noise = torch.rand(self.images.shape[0], self.length, device=self.device)
    if self.autocast != "off":
      dt = torch.bfloat16 if self.autocast == "bfloat16" else torch.float16
      with torch.autocast(self.device.type, dtype=dt):
        loss, _, _ = self.model(self.images, noise=noise)
    else:
      loss, _, _ = self.model(self.images, noise=noise)
    self.opt.zero_grad(set_to_none=True)
    if self.scaler is not None:
      self.scaler.scale(loss).backward()
      self.scaler.step(self.opt)
      self.scaler.update()
    else:
      loss.backward()
      self.opt.step()
    self.loss = loss.detach()

  def run(self, k: int) -> float:
    if self.cuda:
      self.torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(k):
      self._step()
    if self.cuda:
      self.torch.cuda.synchronize()
    return (time.perf_counter() - t0) / k

  def peak_memory_bytes(self):
    return int(self.torch.cuda.max_memory_allocated()) if self.cuda else None


# ------------------------------------------------------------------------------------------------
def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", default="convmae_base")
  ap.add_argument("--img_size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on GPU/TPU, "
                  "float32 on CPU)")
  ap.add_argument("--conv_impl", default="visible", help="comma list of visible, dense")
  ap.add_argument("--dwconv_impl", default="auto", help="comma list of auto, lax, shift")
  ap.add_argument("--attention_impl", default="auto", help="comma list of auto, explicit, xla, "
                  "cudnn (cudnn: CUDA GPU and bfloat16 only)")
  ap.add_argument("--remat", default="off", help="comma list of off, on")
  ap.add_argument("--complementary", default="off", help="comma list of off, on: FastConvMAE's "
                  "complementary masks (each image gives 1/(1-mask_ratio) masked targets per step)")
  ap.add_argument("--torch", default="on", choices=("on", "off"), help="off: JAX variants only")
  ap.add_argument("--torch_autocast", default="auto", choices=("auto", "bfloat16", "float16", "off"),
                  help="the twin's mixed precision. auto: bfloat16 on a GPU; on a CPU bfloat16 when "
                  "--dtype is bfloat16, else off. float16 (GPU only) uses a GradScaler")
  ap.add_argument("--steps", type=int, default=5, help="timings per side (the median is reported)")
  ap.add_argument("--inner", type=int, default=None, help="steps per timing (default 1 on CPU, 5 "
                  "on accelerators)")
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
  ap.add_argument("--grad_barrier", default="on", choices=("on", "off"))
  ap.add_argument("--peak_n", type=int, default=None, help="side of the square product that "
                  "measures the matmul peak (default 2048 on CPU, 8192 on accelerators; smaller "
                  "only for smoke runs: a small product understates the peak)")
  hostinfo.add_host_malloc_flag(ap)
  args = ap.parse_args(argv)
  args.host_malloc_reuse = hostinfo.apply_host_malloc(args)     # before JAX starts its backend
  if args.dtype is None:
    args.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  if args.inner is None:
    args.inner = 1 if jax.default_backend() == "cpu" else 5
  lists = {}
  for name, accepted in (("conv_impl", ("visible", "dense")), ("dwconv_impl", ("auto", "lax", "shift")),
                         ("attention_impl", models.transformer.ATTENTION_IMPLS),
                         ("remat", ("off", "on")), ("complementary", ("off", "on"))):
    values = [v.strip() for v in getattr(args, name).split(",") if v.strip()]
    bad = [v for v in values if v not in accepted]
    if bad or not values:
      ap.error(f"--{name} {getattr(args, name)!r}: each entry must be one of {accepted}")
    lists[name] = values
  if args.dtype not in ("float32", "bfloat16"):
    ap.error(f"--dtype {args.dtype!r} is not one of ('float32', 'bfloat16')")
  if args.torch_autocast == "float16" and jax.default_backend() == "cpu":
    ap.error("--torch_autocast float16 needs a GPU (the CPU twin takes bfloat16 or off)")
  try:
    models.config_for(args.model, img_size=args.img_size)
    for impl in lists["attention_impl"]:
      encoder_attention_impl(args, impl)
  except (ValueError, TypeError) as e:
    ap.error(str(e))
  if args.batch < 1 or args.steps < 1 or args.inner < 1 or args.warmup < 0:
    ap.error("--batch, --steps and --inner must be >= 1 and --warmup >= 0")
  return args, lists


def main(argv=None):
  args, lists = parse_args(argv)
  if args.grad_barrier == "off":
    models.layers.grad_barrier = lambda x: x
  device = jax.devices()[0]
  kind = str(device.device_kind)
  print(f"device: {kind} ({jax.default_backend()}), {args.model} {args.img_size}px batch {args.batch} "
        f"{args.dtype}", file=sys.stderr, flush=True)

  # What the official formulation computes for this step: the dense variant's program.
  dense_flops_per_step = step_flops(args, "dense", False)
  sides = []
  for conv_impl, dwconv_impl, attention_impl, remat, comp in itertools.product(
      lists["conv_impl"], lists["dwconv_impl"], lists["attention_impl"], lists["remat"],
      lists["complementary"]):
    side = JaxSide(args, conv_impl, models.dwconv.resolve_dwconv_impl(dwconv_impl), remat == "on",
                   comp == "on", attention_impl)
    print(f"compiled {side.name} in {side.compile_s:.1f} s", file=sys.stderr, flush=True)
    sides.append(side)
  if args.torch == "on":
    sides.append(TorchSide(args))
  matmul_before = measure_matmul_tflops(args.dtype, args.peak_n)

  for side in sides:
    side.run(max(args.warmup, 0) or 1)
  times = {id(s): [] for s in sides}
  for _ in range(args.steps):
    for side in sides:
      times[id(side)].append(side.run(args.inner))
  matmul_tflops = max(matmul_before, measure_matmul_tflops(args.dtype, args.peak_n))
  peak = datasheet_peak(kind, args.dtype)

  torch_ips = None
  if args.torch == "on":
    torch_ips = args.batch / statistics.median(times[id(sides[-1])])
  for side in sides:
    med = statistics.median(times[id(side)])
    ips = args.batch / med
    # A reconstructed target is one masked view of an image with its loss: one per image, or one
    # per complementary group. The official formulation's work per target is the dense step's.
    tps = args.batch * side.groups / med
    dense_flops = dense_flops_per_step * side.groups
    row = dict(side.meta, model=args.model, img_size=args.img_size, batch=args.batch,
               backend=jax.default_backend(), device=kind,
               cpu=hostinfo.cpu_name(), host_malloc_reuse=args.host_malloc_reuse,
               step_s_median=sig(med, 5), step_s_all=[round(t, 5) for t in times[id(side)]],
               images_per_s=sig(ips), targets_per_s=sig(tps), groups=side.groups,
               steps_per_timing=args.inner,
               final_loss=float(side.loss), matmul_peak_tflops=sig(matmul_tflops),
               datasheet_peak_tflops=peak, flops_dense_equiv=dense_flops,
               tflops_dense_equiv=sig(dense_flops / med / 1e12),
               mfu_dense_equiv_vs_measured=sig(dense_flops / med / 1e12 / matmul_tflops))
    if peak:
      row["mfu_dense_equiv_vs_datasheet"] = sig(dense_flops / med / 1e12 / peak)
    if isinstance(side, JaxSide):
      row.update(flops_executed=side.flops_executed,
                 tflops_executed=sig(side.flops_executed / med / 1e12),
                 mfu_executed_vs_measured=sig(side.flops_executed / med / 1e12 / matmul_tflops),
                 compile_s=round(side.compile_s, 1), memory_bytes_compiled=side.memory_bytes)
      if peak:
        row["mfu_executed_vs_datasheet"] = sig(side.flops_executed / med / 1e12 / peak)
      if torch_ips:
        row["speed_vs_torch"] = round(ips / torch_ips, 3)
        row["targets_per_s_vs_torch"] = round(tps / torch_ips, 3)
    else:
      row.update(flops_executed=dense_flops, memory_bytes_peak=side.peak_memory_bytes())
    print(json.dumps(row), flush=True)
  stats = getattr(device, "memory_stats", lambda: None)()
  if stats and "peak_bytes_in_use" in stats:
    print(json.dumps({"jax_process_peak_bytes_in_use": int(stats["peak_bytes_in_use"])}), flush=True)


if __name__ == "__main__":
  main()
