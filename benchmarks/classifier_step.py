"""Times a fine-tuning step and a linear-probe step of ConvViT, JAX beside the PyTorch twin, in one run.

    python benchmarks/classifier_step.py --model convvit_base --img_size 224 --batch 8 --steps 5

Fine-tuning step: forward + backward + AdamW with layer-wise lr decay, drop path 0.1, soft-target
cross entropy on mixup-style soft targets (the JAX step is `train.step.build_train_step`, as the
trainer runs it). Linear-probe step: the frozen encoder forward (no backward through it) +
BatchNorm + head + LARS. Evaluation step (``--jobs eval``): the model's forward pass in eval mode
(PyTorch under ``no_grad``). ``--dtype bfloat16``: JAX computes in bfloat16 (float32 parameters)
and the twin's forward runs under ``torch.autocast("cpu", dtype=torch.bfloat16)``. The sides
alternate A B A B and the medians of the timed rounds are compared, after untimed ones
(``--warmup``: 2 for a training step, 16 for a forward-only one, whose host heap settles over its
first ~15 steps). Prints one JSON line per job and JAX variant with each side's median step time,
images/s, the JAX/PyTorch speed ratio and how many cores each side kept busy (process CPU time over
wall time in its timed steps: 2.0 is both cores of a 2-core machine). JAX variants (timed in turns
with the twin): ``--dwconv_backward`` (the depthwise conv's backward forms), ``--cpu_matmuls`` (the
trainer's config.cpu_matmuls, train/xla_cpu.py: which library runs XLA:CPU's matrix products;
"auto" is what the trainer does) and ``--kernel_grad`` (the kernel gradient stored once, or
transposed into its consumers as before); each line also gives the variant's last training loss and
a digest of its lowered training step.
"""

import argparse
import functools
import hashlib
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import dwconv_backward as dwconv_backward_bench, hostinfo  # noqa: E402
from convmae_jax import interop, models  # noqa: E402
from convmae_jax.train import losses, optim, sharding as sharding_lib, step as step_lib  # noqa: E402
from convmae_jax.train import xla_cpu  # noqa: E402
from convmae_jax.train.jobs.classify import trainable_filter  # noqa: E402


def eval_step(args, cpu_matmuls: str = "auto"):
  """The evaluation forward pass (model in eval mode, logits of a batch), jitted as the trainer's
  evaluator jits it (forward-only: Eigen under "auto"), in the (params, opt, rest, batch, step)
  shape of the training steps (``opt`` unused, returned as is)."""
  model = models.create(args.model, rngs=nnx.Rngs(0), img_size=args.img_size, num_classes=1000,
                        global_pool=True, dtype=args.dtype,
                        dwconv_impl=getattr(args, "dwconv_impl", "auto"))
  model.eval()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  forward = jax.jit(lambda p, r, images: nnx.merge(graphdef, p, r)(images),
                    compiler_options=xla_cpu.compiler_options(
                        cpu_matmuls, forward_only=True,
                        product=xla_cpu.stage1_product(model.config, args.batch), dtype=args.dtype))

  def step(p, opt, r, batch, step_index):
    del step_index
    return p, opt, r, forward(p, r, batch["image"])
  return step, params, None, rest


def jax_step(job, args, cpu_matmuls: str = "auto"):
  """A compiled (params, opt, rest, batch, step) step and its initial state; ``cpu_matmuls`` as the
  trainer's config.cpu_matmuls (train/xla_cpu.py: "auto" is Eigen for the linear probe)."""
  model = models.create(args.model, rngs=nnx.Rngs(0), img_size=args.img_size, num_classes=1000,
                        drop_path_rate=0.1 if job == "finetune" else 0.0,
                        global_pool=job == "finetune", head_batchnorm=job == "linprobe",
                        dtype=args.dtype, dwconv_impl=getattr(args, "dwconv_impl", "auto"))
  trainable = trainable_filter(job)
  graphdef, params, rest = nnx.split(model, trainable, ...)
  cfg = ml_collections.ConfigDict(dict(b1=0.9, b2=0.999, weight_decay=0.05, layer_decay=0.65,
                                       momentum=0.9))
  schedule = lambda s: 1e-4
  if job == "finetune":
    tx = optim.make_finetune_optimizer(cfg, schedule, params)
  else:
    cfg.weight_decay = 0.0
    tx = optim.make_lars_optimizer(cfg, schedule, params)
  mesh = sharding_lib.make_mesh(-1, 1)
  sh = sharding_lib.state_shardings(mesh, params, rest, tx)

  def loss_fn(m, batch):
    return jnp.mean(losses.soft_target_cross_entropy(m(batch["image"]), batch["target"])), {}

  step = step_lib.build_train_step(graphdef=graphdef, param_filter=trainable, loss_fn=loss_fn, tx=tx,
                               schedule=schedule, shardings=sh, batch_size=args.batch, seed=0,
                               batch_keys=("image", "target"),
                               compiler_options=xla_cpu.compiler_options(
                                   cpu_matmuls, forward_only=job == "linprobe",
                                   product=xla_cpu.stage1_product(model.config, args.batch),
                                   dtype=args.dtype))
  return step, params, tx.init(params), rest


def twin_autocast(args):
  """The twin's precision for ``--dtype``: CPU autocast to bfloat16, or float32 (a no-op context)."""
  return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")


def torch_step(job, args):
  torch.manual_seed(0)
  if job == "eval":
    model = interop.torch_model(args.model, img_size=args.img_size, num_classes=1000,
                                global_pool=True).eval()

    def forward(images, target):
      del target
      with torch.no_grad(), twin_autocast(args):
        return model(images)
    return forward
  model = interop.torch_model(args.model, img_size=args.img_size, num_classes=1000,
                              drop_path_rate=0.1 if job == "finetune" else 0.0,
                              global_pool=job == "finetune")
  if job == "finetune":
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05)
    trainable = model
  else:
    for p in model.parameters():
      p.requires_grad_(False)
    model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(model.head.in_features, affine=False,
                                                          eps=1e-6), model.head)
    for p in model.head.parameters():
      p.requires_grad_(True)
    opt = torch.optim.SGD(model.head.parameters(), lr=1e-4, momentum=0.9)  # LARS costs the same
    trainable = model.head
  model.train()

  def step(images, target):
    with twin_autocast(args):
      logits = model(images)
    logits = logits.float()
    loss = torch.sum(-target * torch.log_softmax(logits, dim=-1), dim=-1).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  del trainable
  return step


def _variant_step(job, args, dwconv_backward: str, cpu_matmuls: str, kernel_grad: str, batch):
  """jax_step with the depthwise conv's backward pass written out (the model's: "written"), written
  out with the kernel gradient as K² shifted products ("taps", the form before the batched
  matmuls) or left to autodiff of its K² taps ("autodiff"), its products in the library
  ``cpu_matmuls`` names (``eval``: the evaluation forward, :func:`eval_step`), traced and compiled by
  its first step here (for an A/B in one process). ``kernel_grad``: "stored" (the model's: a
  kernel gradient computed as dyᵀ·x is transposed into one stored copy) or "transposed" (a bare
  ``.T``, the form before, which XLA folds into the gradient's consumers). JAX's trace caches are
  cleared first, so that the custom VJPs' backward passes are traced anew with the variant's
  helpers (a backward pass traced earlier in the process can be reused otherwise: seen with
  ``jax.vjp`` of ``layers.matmul`` under two jits). Returns (step, state after step 0, compile
  seconds, a digest of the training step's lowered program or "")."""
  jax.clear_caches()
  original = models.dwconv.depthwise_conv_shift
  original_kernel_grad = models.dwconv._kernel_grad
  original_back = models.layers._kernel_grad_back
  if kernel_grad == "transposed":
    models.layers._kernel_grad_back = lambda dk_t: dk_t.T
  if dwconv_backward == "autodiff":
    models.dwconv.depthwise_conv_shift = models.dwconv._shift_taps
  if dwconv_backward == "taps":
    models.dwconv._kernel_grad = models.dwconv._kernel_grad_taps
  if dwconv_backward == "rows":
    models.dwconv._kernel_grad = dwconv_backward_bench.kernel_grad_rows
  try:
    make = eval_step if job == "eval" else functools.partial(jax_step, job)
    step, params, opt, rest = make(args, cpu_matmuls)
    program = ""
    if hasattr(step, "lower"):     # the training steps: a digest of the traced program
      text = step.lower(params, opt, rest, batch, np.int32(0)).as_text()
      program = hashlib.sha1(text.encode()).hexdigest()[:12]
    t0 = time.perf_counter()
    params, opt, rest, m = step(params, opt, rest, batch, np.int32(0))
    jax.block_until_ready(m)
    return step, (params, opt, rest), time.perf_counter() - t0, program
  finally:
    models.dwconv.depthwise_conv_shift = original
    models.dwconv._kernel_grad = original_kernel_grad
    models.layers._kernel_grad_back = original_back


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="convvit_base")
  ap.add_argument("--img_size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=None,
                  help="untimed rounds first (default: 2 for finetune; 16 for linprobe and eval, "
                       "whose host heap settles over their first ~15 steps, BENCHMARKS.md)")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                  help="JAX compute dtype; bfloat16 runs the twin under CPU autocast")
  ap.add_argument("--jobs", default="finetune,linprobe",
                  help="comma list of finetune, linprobe, eval (the evaluation forward pass)")
  ap.add_argument("--dwconv_impl", default="auto", choices=("auto", "shift", "lax"),
                  help="the JAX model's depthwise conv (auto: shift on CPU)")
  ap.add_argument("--dwconv_backward", default="written",
                  help="comma list of written (the model's), rows (written, with the kernel "
                       "gradient's products contracting the rows, its form before), taps (written, "
                       "with the kernel gradient as K² shifted products), autodiff (autodiff of "
                       "the shift conv's taps): the JAX variants, timed in turns with the twin")
  ap.add_argument("--cpu_matmuls", default="auto",
                  help="comma list of auto, ynnpack, eigen (the trainer's config.cpu_matmuls: the "
                       "library of XLA:CPU's matrix products): more JAX variants, timed in turns")
  ap.add_argument("--kernel_grad", default="stored",
                  help="comma list of stored (the model's: a kernel gradient computed as dyᵀ·x is "
                       "transposed into one stored copy), transposed (a bare .T, folded by XLA into "
                       "the gradient's consumers: the form before): more JAX variants, in turns")
  ap.add_argument("--grad_barrier", default="on", choices=("on", "off"),
                  help="off: layers.grad_barrier becomes the plain identity (to measure what it saves)")
  hostinfo.add_host_malloc_flag(ap)
  args = ap.parse_args()
  host_malloc_reuse = hostinfo.apply_host_malloc(args)     # before JAX starts its backend
  backward_forms = args.dwconv_backward.split(",")
  if not backward_forms or any(v not in ("written", "rows", "taps", "autodiff")
                               for v in backward_forms):
    ap.error(f"--dwconv_backward {args.dwconv_backward!r} is not valid: expected a comma list of "
             "written, rows, taps, autodiff")
  libraries = args.cpu_matmuls.split(",")
  if any(v not in xla_cpu.CPU_MATMULS for v in libraries):
    ap.error(f"--cpu_matmuls {args.cpu_matmuls!r} is not valid: expected a comma list of "
             f"{', '.join(xla_cpu.CPU_MATMULS)}")
  kernel_grads = args.kernel_grad.split(",")
  if any(v not in ("stored", "transposed") for v in kernel_grads):
    ap.error(f"--kernel_grad {args.kernel_grad!r} is not valid: expected a comma list of stored, "
             "transposed")
  variants = list(dict.fromkeys((b, c, k) for b in backward_forms for c in libraries
                                 for k in kernel_grads))     # each once: a repeat would share state
  if args.grad_barrier == "off":
    models.layers.grad_barrier = lambda x: x

  if any(j not in ("finetune", "linprobe", "eval") for j in args.jobs.split(",")):
    ap.error(f"--jobs {args.jobs!r} is not valid: expected a comma list of finetune, linprobe, eval")
  rng = np.random.default_rng(0)
  images = rng.normal(size=(args.batch, args.img_size, args.img_size, 3)).astype(np.float32)
  target = rng.dirichlet(np.ones(1000), size=args.batch).astype(np.float32)
  batch = {"image": jnp.asarray(images), "target": jnp.asarray(target)}
  for job in args.jobs.split(","):
    sides, compile_s, programs = {}, {}, {}
    for v in variants:
      step, state, compile_s[v], programs[v] = _variant_step(job, args, *v, batch)
      sides[v] = [step, state]
    tstep = torch_step(job, args)
    timg = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    ttarget = torch.from_numpy(target)
    times = {v: [] for v in variants}
    last = {}
    cpu = {v: 0.0 for v in variants}
    tt, tcpu = [], 0.0
    warmup = args.warmup if args.warmup is not None else (2 if job == "finetune" else 16)
    for i in range(warmup + args.steps):          # every side once per round, in turns
      for v in variants:
        step, (params, opt, rest) = sides[v]
        t0, c0 = time.perf_counter(), time.process_time()
        params, opt, rest, m = step(params, opt, rest, batch, np.int32(i + 1))
        jax.block_until_ready(m)
        sides[v][1] = (params, opt, rest)
        last[v] = m
        if i >= warmup:
          times[v].append(time.perf_counter() - t0)
          cpu[v] += time.process_time() - c0
      t0, c0 = time.perf_counter(), time.process_time()
      tstep(timg, ttarget)
      if i >= warmup:
        tt.append(time.perf_counter() - t0)
        tcpu += time.process_time() - c0
    t_med = statistics.median(tt)
    for v in variants:
      j_med = statistics.median(times[v])
      print(json.dumps({
          "job": job, "model": args.model, "img_size": args.img_size, "batch": args.batch,
          "jax_dtype": args.dtype, "steps": args.steps, "warmup": warmup,
          "torch_autocast": "bfloat16" if args.dtype == "bfloat16" else "off",
          "dwconv_impl": args.dwconv_impl, "dwconv_backward": v[0],
          "kernel_grad": v[2], "cpu_matmuls": v[1], "cpu_matmuls_resolved": xla_cpu.resolve(
              v[1], forward_only=job != "finetune", product=xla_cpu.stage1_product(
                  models.config_for(args.model, img_size=args.img_size), args.batch),
              dtype=args.dtype) if not xla_cpu.user_flag_set() else "XLA_FLAGS",
          "grad_barrier": args.grad_barrier, "host_malloc_reuse": host_malloc_reuse,
          "backend": jax.default_backend(),
          "device": str(jax.devices()[0].device_kind), "cpu": hostinfo.cpu_name(),
          "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
          "jax_step_s": round(j_med, 6), "torch_step_s": round(t_med, 6),
          "jax_images_per_s": round(args.batch / j_med, 2),
          "torch_images_per_s": round(args.batch / t_med, 2),
          "jax_vs_torch_speed": round(t_med / j_med, 2),
          "jax_cpu_per_wall": round(cpu[v] / sum(times[v]), 2),
          "torch_cpu_per_wall": round(tcpu / sum(tt), 2), "cores": os.cpu_count(),
          "jax_compile_s": round(compile_s[v], 1), "jax_program": programs[v],
          # the training loss of the last step (None for the evaluation forward): variants agree
          # to float reordering
          "jax_loss": float(last[v]["loss"]) if isinstance(last[v], dict) else None}),
          flush=True)


if __name__ == "__main__":
  main()
