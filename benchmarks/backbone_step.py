"""Forward + backward of a detection / segmentation backbone, JAX beside its PyTorch twin, one run.

    python benchmarks/backbone_step.py --jobs det:1024,seg:512 --size base --batch 1 --steps 3

Per job (`preset:img_size`): the JAX step (`jax.value_and_grad` of a scalar over all pyramid
outputs, jitted) and the twin's (`loss.backward()`) run alternately A B A B after warm-up; the medians
are compared. Both start from the same weights (the JAX init exported to the twin). Loss = Σ over outputs of mean(map²), a stand-in for a head. Drop path off on both
sides; the segmentation backbone's BatchNorm in training mode on both.

Peak memory: JAX from the compiled executable's memory analysis (arguments + outputs + temporaries
− aliased); on CPU also, for both sides, the peak resident memory a separate child process adds
during its first step (after building the model and, for JAX, compiling) (Linux `VmHWM` after resetting it, minus `VmRSS` before the step); on CUDA
`torch.cuda.max_memory_allocated`. One JSON line per job.

`--separate` (for sizes where both sides do not fit one process's memory, e.g. the detection preset
at 1024 px on a 24 GB machine): each side runs in its own child process, JAX first, then the twin,
from the same weights; the first step is the one whose peak resident memory is measured, the medians
are of the steps after the warm-up. The ratio then no longer has the A B A B alternation's
protection against load changes: run it on an otherwise idle machine.

`--cpu_memory_scheduler`: XLA:CPU's default concurrency-optimized scheduler places work for
parallelism, not memory; this switches it off (`--xla_cpu_enable_concurrency_optimized_scheduler=false`),
which lowers the detection step's compiled peak at 1024 px from 19.0 to 13.8 GB. No effect off CPU.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CPU_MEMORY_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if "--cpu_memory_scheduler" in sys.argv:      # XLA reads its flags once, when the backend starts
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + CPU_MEMORY_FLAG).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks import hostinfo  # noqa: E402
from convmae_jax import models  # noqa: E402
from convmae_jax.interop import backbone as ib, torch_backbone  # noqa: E402


def _status_kib(field):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return 0


def jax_step(name, args, build_abstract=False):
  make = lambda: models.create(name, rngs=nnx.Rngs(0), img_size=args.img, drop_path_rate=0.0,
                               dtype=args.dtype, remat=args.remat, dwconv_impl=args.dwconv_impl,
                               attention_impl=args.attention_impl)
  model = nnx.eval_shape(make) if build_abstract else make()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p, rest, images):
    out = nnx.merge(graphdef, p, rest, copy=True).features(images)  # BatchNorm may update stats
    return sum(jnp.mean(jnp.square(v.astype(jnp.float32))) for v in out.values())

  step = jax.jit(jax.value_and_grad(loss_fn))
  if build_abstract:
    images = jax.ShapeDtypeStruct((args.batch, args.img, args.img, 3), jnp.float32)
  else:
    images = jnp.asarray(np.random.default_rng(0).standard_normal(
        (args.batch, args.img, args.img, 3)).astype(np.float32))
  t0 = time.perf_counter()
  compiled = step.lower(params, rest, images).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)

  def run():
    loss, grads = compiled(params, rest, images)
    jax.block_until_ready(grads)
    return float(loss)
  return run, compile_s, peak, model


def torch_step(name, args, jax_model=None):
  """The twin's step; with `jax_model`, the twin starts from the same weights (equal losses)."""
  torch.manual_seed(0)
  model = torch_backbone.torch_backbone(name, img_size=args.img, drop_path_rate=0.0)
  if jax_model is not None:
    sd = ib.to_backbone_state_dict(jax_model)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  model = model.to(args.device)
  model.train()
  images = torch.from_numpy(np.random.default_rng(0).standard_normal(
      (args.batch, args.img, args.img, 3)).astype(np.float32)).permute(0, 3, 1, 2).contiguous()
  images = images.to(args.device)

  def run():
    model.zero_grad(set_to_none=True)
    out = model(images)
    loss = sum((v ** 2).mean() for v in out.values())
    loss.backward()
    if args.device.startswith("cuda"):
      torch.cuda.synchronize()
    return loss.item()
  return run


def child(side, name, args, timed=False):
  """Runs `run_child` in a fresh process; its JSON record, or None (its stderr is printed)."""
  cmd = [sys.executable, os.path.abspath(__file__), "--child", side, "--jobs",
         f"{args.preset}:{args.img}", "--size", args.size, "--batch", str(args.batch),
         "--dtype", args.dtype, "--steps", str(args.steps), "--warmup", str(args.warmup),
         "--dwconv_impl", args.dwconv_impl, "--attention_impl", args.attention_impl]
  cmd += ["--remat"] * args.remat + ["--cpu_memory_scheduler"] * args.cpu_memory_scheduler
  cmd += ["--separate"] * timed
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  for line in out.stdout.splitlines()[::-1]:
    if line.startswith("{"):
      return json.loads(line)
  print(out.stderr[-2000:], file=sys.stderr)
  return None


def child_peak(side, name, args):
  """Extra peak resident memory (bytes) one step adds, measured in a fresh process (CPU)."""
  rec = child(side, name, args)
  return None if rec is None else rec["peak_rss_step_bytes"]


def run_child(side, name, args):
  """The first step's extra peak resident memory; with --separate also the timed steps (the first
  step counts as one warm-up step) and the loss. Both sides start from the JAX initialisation."""
  rec = {}
  if side == "jax":
    run, rec["compile_s"], rec["compiled_peak_bytes"], jmodel = jax_step(name, args)
  else:
    jmodel = models.create(name, rngs=nnx.Rngs(0), img_size=args.img, drop_path_rate=0.0,
                           dtype=args.dtype) if args.separate else None
    run = torch_step(name, args, jmodel)
  del jmodel
  # The first execution is measured on both sides, because later ones reuse memory the allocators
  # already hold.
  before = _status_kib("VmRSS")
  with open("/proc/self/clear_refs", "w") as f:   # resets VmHWM to the current RSS
    f.write("5")
  rec["loss"] = run()
  rec["peak_rss_step_bytes"] = (_status_kib("VmHWM") - before) * 1024
  if args.separate:
    times = []
    for i in range(max(args.warmup - 1, 0) + args.steps):
      t0 = time.perf_counter()
      run()
      if i >= args.warmup - 1:
        times.append(time.perf_counter() - t0)
    rec["step_s"] = times
  print(json.dumps(rec))


def _record(name, args, **fields):
  """A JSON record: what was run, on what, then `fields`."""
  return {"job": args.preset, "model": name, "img_size": args.img, "batch": args.batch,
          "jax_dtype": args.dtype, "remat": args.remat, "dwconv_impl": args.dwconv_impl,
          "attention_impl": args.attention_impl,
          "backend": jax.default_backend(), "cpu": hostinfo.cpu_name(), **fields}


def separate_record(name, args):
  """--separate: JAX's child, then the twin's, one after the other."""
  j = child("jax", name, args, timed=True)
  t = child("torch", name, args, timed=True)
  if j is None or t is None:
    raise SystemExit(f"a child process failed (jax: {j is not None}, torch: {t is not None})")
  j_med, t_med = statistics.median(j["step_s"]), statistics.median(t["step_s"])
  return _record(name, args, mode="separate", cpu_memory_scheduler=args.cpu_memory_scheduler,
                 torch=torch.__version__, torch_threads=torch.get_num_threads(), steps=args.steps,
                 jax_step_s=round(j_med, 3), torch_step_s=round(t_med, 3),
                 jax_vs_torch_speed=round(t_med / j_med, 2), jax_compile_s=round(j["compile_s"], 1),
                 jax_loss=round(j["loss"], 6), torch_loss=round(t["loss"], 6),
                 jax_compiled_peak_bytes=j["compiled_peak_bytes"],
                 jax_step_peak_rss_bytes=j["peak_rss_step_bytes"],
                 torch_step_peak_rss_bytes=t["peak_rss_step_bytes"])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--jobs", default="det:1024,seg:512", help="preset:img_size,...")
  ap.add_argument("--size", default="base")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--remat", action="store_true")
  ap.add_argument("--dwconv_impl", default="auto", choices=("auto", "shift", "lax"),
                  help="JAX's depthwise convolution (auto: shift on CPU, lax elsewhere)")
  ap.add_argument("--attention_impl", default="auto", choices=("auto", "explicit", "xla", "cudnn"),
                  help="JAX's attention (auto: cuDNN on a CUDA GPU in bfloat16, else explicit)")
  ap.add_argument("--memory", default="auto", choices=("auto", "off"),
                  help="auto: child-process peak RSS on CPU, max_memory_allocated on CUDA")
  ap.add_argument("--compile_only", action="store_true",
                  help="JAX: only compile the step and report its compiled peak memory (for sizes "
                       "that do not fit this machine's memory); the twin still runs unless "
                       "--no_torch")
  ap.add_argument("--no_torch", action="store_true", help="with --compile_only: skip the twin")
  ap.add_argument("--separate", action="store_true",
                  help="each side in its own child process, one after the other (CPU)")
  ap.add_argument("--cpu_memory_scheduler", action="store_true",
                  help="XLA:CPU: schedule for memory, not concurrency (read before jax starts)")
  ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args()
  args.device = "cuda" if torch.cuda.is_available() else "cpu"
  if args.attention_impl == "cudnn":
    cfg = models.config_for(f"convvit_det_{args.size}", dtype=args.dtype)
    try:  # the device and dtype, before anything is built (shapes are checked when traced)
      models.transformer.resolve_attention_impl("cudnn", dtype=cfg.jnp_dtype, length=2, has_bias=True,
                                           head_dim=cfg.embed_dims[2] // cfg.num_heads)
    except ValueError as e:
      ap.error(str(e))

  for job in args.jobs.split(","):
    args.preset, img = job.split(":")
    args.img = int(img)
    name = f"convvit_{args.preset}_{args.size}"
    if args.child:
      run_child(args.child, name, args)
      return
    if args.compile_only:
      _, compile_s, jax_peak, _ = jax_step(name, args, build_abstract=True)
      rec = _record(name, args, cpu_memory_scheduler=args.cpu_memory_scheduler,
                    jax_compile_s=round(compile_s, 1), jax_compiled_peak_bytes=jax_peak)
      if not args.no_torch:                      # the twin alone, from its own initialisation
        trun = torch_step(name, args)
        trun()
        times = []
        for i in range(args.warmup + args.steps):
          t0 = time.perf_counter()
          trun()
          if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        rec.update({"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "steps": args.steps, "torch_step_s": round(statistics.median(times), 3)})
        if args.device == "cuda":
          rec["torch_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
        elif args.memory == "auto":
          rec["torch_step_peak_rss_bytes"] = child_peak("torch", name, args)
      print(json.dumps(rec), flush=True)
      continue
    if args.separate:
      print(json.dumps(separate_record(name, args)), flush=True)
      continue
    jrun, compile_s, jax_peak, jmodel = jax_step(name, args)
    trun = torch_step(name, args, jmodel)
    del jmodel
    jl, tl = jrun(), trun()
    if args.device == "cuda":
      torch.cuda.reset_peak_memory_stats()
    jt, tt = [], []
    for i in range(args.warmup + args.steps):
      t0 = time.perf_counter()
      jrun()
      t1 = time.perf_counter()
      trun()
      t2 = time.perf_counter()
      if i >= args.warmup:
        jt.append(t1 - t0)
        tt.append(t2 - t1)
    j_med, t_med = statistics.median(jt), statistics.median(tt)
    rec = _record(name, args, device=str(jax.devices()[0].device_kind))
    rec.update({"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                "steps": args.steps, "jax_step_s": round(j_med, 3), "torch_step_s": round(t_med, 3),
                "jax_vs_torch_speed": round(t_med / j_med, 2), "jax_compile_s": round(compile_s, 1),
                "jax_loss": round(jl, 6), "torch_loss": round(tl, 6),
                "jax_compiled_peak_bytes": jax_peak})
    if args.device == "cuda":
      rec["torch_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    elif args.memory == "auto":
      rec["jax_step_peak_rss_bytes"] = child_peak("jax", name, args)
      rec["torch_step_peak_rss_bytes"] = child_peak("torch", name, args)
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
  main()
