"""Times one training step under several XLA_FLAGS settings, each in its own process, in turns.

    python benchmarks/xla_flags.py --step finetune --model convvit_base --batch 8 \
        --candidate=--xla_cpu_use_xnnpack=false --candidate=--xla_cpu_enable_fast_math=true

XLA reads its flags once per process, so every candidate (one ``--candidate=FLAGS`` each, added to
any XLA_FLAGS already set) runs in a fresh child process (the same script with ``--child``), and so
does the reference, XLA's defaults, which runs first. They take turns for ``--rounds`` rounds, so a
slow phase of a shared machine hits them alike. ``--step`` picks the program: ``pretrain`` (the
ConvMAE step of ``step_vs_torch.py``, visible-only stages), ``finetune`` / ``linprobe`` (the
trainer's classifier steps of ``classifier_step.py``, compiled without the trainer's per-program
``config.cpu_matmuls`` choice, so the flags alone decide). Prints one JSON line per candidate: the
median step time over all rounds, the speed relative to XLA's defaults, the compile time and the
final loss (which must agree with the defaults' up to float reordering for a flag to be usable). A
flag that XLA rejects shows as an error line, not a failure of the whole run. ``--host_malloc
system,reuse`` runs every candidate under each host memory mode too (convmae_jax/host_malloc.py:
glibc's defaults, or freed memory reused; process-wide, so it also needs a process each).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child(args) -> None:
  from convmae_jax import host_malloc
  host_malloc.apply(args.host_malloc)     # before JAX starts its backend
  import jax
  import jax.numpy as jnp
  import numpy as np
  from benchmarks import classifier_step, step_vs_torch

  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(args.batch, args.img_size, args.img_size, 3)),
                       jnp.float32)
  if args.step == "pretrain":
    ns = argparse.Namespace(model=args.model, img_size=args.img_size, dtype=args.dtype,
                            batch=args.batch)
    step, params, opt, _ = step_vs_torch.make_step(ns, "visible", "auto", False)
    compiled = jax.jit(step, donate_argnums=(0, 1))
    state = [params, opt]

    def run(i):
      state[0], state[1], loss = compiled(state[0], state[1], images, jax.random.key(i))
      return loss
  else:
    ns = argparse.Namespace(model=args.model, img_size=args.img_size, dtype=args.dtype,
                            batch=args.batch)
    # "ynnpack": no per-program option, so XLA_FLAGS alone decide (the trainer's "auto" would
    # compile a large linear probe with Eigen's products whatever the candidate says).
    step, params, opt, rest = classifier_step.jax_step(args.step, ns, "ynnpack")
    target = jnp.asarray(rng.dirichlet(np.ones(1000), size=args.batch), jnp.float32)
    batch = {"image": images, "target": target}
    state = [params, opt, rest]

    def run(i):
      state[0], state[1], state[2], m = step(state[0], state[1], state[2], batch, np.int32(i))
      return m["loss"]

  t0 = time.perf_counter()
  jax.block_until_ready(run(0))
  compile_s = time.perf_counter() - t0
  times = []
  loss = None
  for i in range(1, args.warmup + args.steps + 1):
    t0 = time.perf_counter()
    loss = jax.block_until_ready(run(i))
    if i > args.warmup:
      times.append(time.perf_counter() - t0)
  print(json.dumps({"times": times, "compile_s": compile_s, "loss": float(loss)}), flush=True)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--step", default="finetune", choices=("pretrain", "finetune", "linprobe"))
  ap.add_argument("--model", default="convvit_base")
  ap.add_argument("--img_size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--candidate", action="append", default=[],
                  help="XLA_FLAGS to try, as --candidate=--xla_cpu_...; repeat for more")
  ap.add_argument("--host_malloc", default="system",
                  help="comma list of system, reuse, auto (convmae_jax/host_malloc.py): each "
                       "XLA_FLAGS candidate runs under each; the first is the reference's")
  ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    child(args)
    return
  from convmae_jax import host_malloc
  modes = [m.strip() for m in args.host_malloc.split(",") if m.strip()]
  if not modes or any(m not in host_malloc.HOST_MALLOC for m in modes):
    ap.error(f"--host_malloc {args.host_malloc!r} is not valid: expected a comma list of "
             f"{', '.join(host_malloc.HOST_MALLOC)}")
  if args.step != "pretrain" and args.model.startswith("convmae"):
    ap.error(f"--step {args.step} needs a classifier --model (convvit_*), not {args.model!r}")

  base = os.environ.get("XLA_FLAGS", "")
  args.candidates = [(flags, mode) for flags in [""] + [c for c in args.candidate if c.strip()]
                     for mode in modes]
  results = {c: {"times": [], "compile_s": [], "loss": None, "error": None} for c in args.candidates}
  child_argv = ["--step", args.step, "--model", args.model, "--img_size", str(args.img_size),
                "--batch", str(args.batch), "--dtype", args.dtype, "--steps", str(args.steps),
                "--warmup", str(args.warmup)]
  for r in range(args.rounds):
    for cand in args.candidates:
      if results[cand]["error"]:
        continue
      env = dict(os.environ, XLA_FLAGS=f"{base} {cand[0]}".strip())
      proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *child_argv,
                             "--host_malloc", cand[1]], env=env, capture_output=True, text=True)
      lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
      if proc.returncode or not lines:
        results[cand]["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        continue
      got = json.loads(lines[-1])
      results[cand]["times"] += got["times"]
      results[cand]["compile_s"].append(got["compile_s"])
      results[cand]["loss"] = got["loss"]
      print(f"round {r + 1}: {cand[0] or '(defaults)'}, host_malloc {cand[1]}: "
            f"{statistics.median(got['times']):.3f} s/step",
            file=sys.stderr, flush=True)

  from benchmarks import hostinfo
  ref = results[args.candidates[0]]
  ref_s = statistics.median(ref["times"]) if ref["times"] else None
  for cand in args.candidates:
    res = results[cand]
    row = {"step": args.step, "model": args.model, "img_size": args.img_size, "batch": args.batch,
           "dtype": args.dtype, "cpu": hostinfo.cpu_name(), "xla_flags": cand[0],
           "host_malloc": cand[1]}
    if res["error"]:
      row["error"] = res["error"]
    else:
      med = statistics.median(res["times"])
      row.update(step_s_median=round(med, 4), step_s_min=round(min(res["times"]), 4),
                 speed_vs_defaults=round(ref_s / med, 3) if ref_s else None,
                 compile_s=round(statistics.median(res["compile_s"]), 1), final_loss=res["loss"],
                 loss_vs_defaults=(None if ref["loss"] is None else res["loss"] - ref["loss"]))
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
