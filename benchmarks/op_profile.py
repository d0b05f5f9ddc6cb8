"""Where a training step's time goes, per operation, JAX beside the PyTorch twin, in one run.

    python benchmarks/op_profile.py --job finetune --model convvit_base --img_size 224 --batch 8

JAX: the step (the trainer's ``build_train_step``, as ``classifier_step.py`` builds it) runs under
``jax.profiler.trace``; every executed XLA operation (a thunk of the compiled program: a fusion, a
dot, a convolution, a copy ...) is looked up in the optimized HLO, which XLA dumps into a temporary
folder, and put in a category by what it computes (a fusion by the ops inside it). PyTorch: the same
step under ``torch.profiler``; each ATen operator's self time is put in the same categories. Threads
run operations side by side, so the times are thread time per step (their sum may exceed the wall
time); shares are of that sum. The JAX step is compiled as the trainer compiles it (its
``config.cpu_matmuls`` choice included). Blind spot: the trace does not give matrix products
that XLA:CPU runs itself (Eigen's, when YNN fusions are off) their time (the fine-tuning step's
matmul category fell from 7.1 s to 0.6 s per step with ``--xla_cpu_experimental_ynn_fusion_type=``
while the step got slower), so compare such runs by step time, not by the matmul category.

Prints JSON lines: one per (side, category) with ``ms_per_step`` and ``share``, then the ``--top``
operations of each side (``op``, ``category``, ``ms_per_step``, ``count_per_step``; for JAX the
fused ops and the output shape). Thread time overstates what an operation costs the step when
another ran beside it, so the JAX lines also give ``alone_ms_per_step``: the time during which no
other operation ran (summed, it is the part of the step that ran one operation at a time), and the
total line ``ms_per_step_with_n_running`` (how long 0, 1, 2 ... operations ran at once);
``--sort alone`` lists the operations by it. Categories: matmul, convolution, depthwise_conv,
reduction, transcendental (exp, log, erf, tanh: softmax, GELU), elementwise, copy_transpose,
gather_scatter, optimizer (PyTorch's fused optimizer kernels; JAX's optimizer is elementwise
fusions), other.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import classifier_step, hostinfo  # noqa: E402
from convmae_jax.train import xla_cpu  # noqa: E402

CATEGORIES = ("matmul", "convolution", "depthwise_conv", "reduction", "transcendental",
              "elementwise", "copy_transpose", "gather_scatter", "optimizer", "other")

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_TRANSCENDENTAL = {"exponential", "log", "erf", "tanh", "logistic", "power", "rsqrt", "sqrt",
                   "exponential-minus-one", "log-plus-one", "cbrt"}
_DATA_MOVE = {"copy", "transpose", "reshape", "bitcast", "broadcast", "slice", "concatenate", "pad",
              "reverse", "parameter", "constant", "tuple", "get-tuple-element", "bitcast-convert",
              "convert", "iota", "dynamic-update-slice", "dynamic-slice"}


def parse_hlo(text: str):
  """{computation: [(name, shape, opcode, rest)]} of an HLO module's text."""
  comps, current = {}, None
  for line in text.splitlines():
    if current is None or line.startswith(("ENTRY", "%")) and line.rstrip().endswith("{"):
      m = _COMP.match(line)
      if m:
        current = m.group(1)
        comps[current] = []
        continue
    if line.startswith("}"):
      current = None
      continue
    if current is not None:
      m = _INSTR.match(line)
      if m:
        comps[current].append(m.groups())
  return comps


def _called(rest: str) -> list[str]:
  return re.findall(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-, %]+)\}?",
                    rest)


def classify(opcode: str, rest: str, comps) -> tuple[str, list[str]]:
  """(category, the opcodes inside) of one executed instruction."""
  inner = [opcode]
  if opcode == "fusion" or opcode == "call":
    for group in _called(rest):
      for name in group.replace("%", "").split(","):
        for _, _, op, r in comps.get(name.strip(), []):
          inner.append(op)
          if op in ("fusion", "call"):
            inner.extend(classify(op, r, comps)[1])
  ops = set(inner)
  if ops & {"dot"} or (opcode == "custom-call" and "matmul" in rest.lower()):
    return "matmul", inner
  if "convolution" in ops:
    group = re.search(r"feature_group_count=(\d+)", rest)
    if group and int(group.group(1)) > 1:
      return "depthwise_conv", inner
    for name in _called(rest):
      for _, _, op, r in comps.get(name.replace("%", "").strip(), []):
        g = re.search(r"feature_group_count=(\d+)", r)
        if op == "convolution" and g and int(g.group(1)) > 1:
          return "depthwise_conv", inner
    return "convolution", inner
  if ops & {"gather", "scatter"}:
    return "gather_scatter", inner
  if ops & {"reduce", "reduce-window", "select-and-scatter"}:
    return "reduction", inner
  if ops & _TRANSCENDENTAL:
    return "transcendental", inner
  if ops <= _DATA_MOVE | {"fusion", "call"}:
    return "copy_transpose", inner
  if opcode in ("while", "conditional", "custom-call", "all-reduce", "after-all"):
    return "other", inner
  return "elementwise", inner


def dump_hlo_flags() -> str:
  """Adds an HLO dump folder to XLA_FLAGS (before JAX starts its backend, which reads them once)
  and returns it: the optimized HLO is how the JAX operations are classified."""
  folder = tempfile.mkdtemp(prefix="convmae-op-profile-hlo-")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={folder} "
                             "--xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*train_step.*").strip()
  return folder


def hlo_index(texts) -> dict:
  """{instruction name: (category, fused opcodes, shape)} over HLO module texts."""
  index = {}
  for text in texts:
    comps = parse_hlo(text)
    for instrs in comps.values():
      for name, shape, opcode, rest in instrs:
        category, inner = classify(opcode, rest, comps)
        index[name] = (category, inner, shape)
  return index


def jax_profile(args, images, target, dump_dir):
  from tensorflow.tsl.profiler.protobuf import xplane_pb2   # TF ships the XSpace proto

  step, params, opt, rest = classifier_step.jax_step(args.job, args, args.cpu_matmuls)
  batch = {"image": jnp.asarray(images), "target": jnp.asarray(target)}
  for i in range(args.warmup):
    params, opt, rest, m = step(params, opt, rest, batch, np.int32(i))
  jax.block_until_ready(m)
  trace_dir = tempfile.mkdtemp(prefix="convmae-op-profile-trace-")
  with jax.profiler.trace(trace_dir):
    for i in range(args.steps):
      params, opt, rest, m = step(params, opt, rest, batch, np.int32(args.warmup + i))
    jax.block_until_ready(m)
  texts = []
  for path in glob.glob(os.path.join(dump_dir, "*train_step*after_optimizations.txt")):
    with open(path) as f:
      texts.append(f.read())
  index = hlo_index(texts)
  space = xplane_pb2.XSpace()
  with open(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[-1], "rb") as f:
    space.ParseFromString(f.read())
  per_op = collections.defaultdict(lambda: [0.0, 0, 0.0])
  intervals = []
  for plane in space.planes:
    if plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      if line.name == "python":
        continue
      for ev in line.events:
        name = plane.event_metadata[ev.metadata_id].name
        if name in index:
          start = line.timestamp_ns * 1000 + ev.offset_ps
          intervals.append((start, start + ev.duration_ps, name))
  alone, concurrency = alone_times([(a, b) for a, b, _ in intervals])
  for (start, end, name), solo in zip(intervals, alone):
    per_op[name][0] += (end - start) / 1e9    # ms
    per_op[name][1] += 1
    per_op[name][2] += solo / 1e9
  rows = []
  for name, (ms, count, solo) in per_op.items():
    category, inner, shape = index[name]
    fused = sorted(set(inner) - {"fusion", "parameter", "constant", "tuple", "get-tuple-element"})
    rows.append({"op": name, "category": category, "ms_per_step": ms / args.steps,
                 "alone_ms_per_step": solo / args.steps,
                 "count_per_step": count / args.steps, "shape": shape[:60],
                 "fused": ",".join(fused)[:120]})
  running = {n: round(ps / 1e9 / args.steps, 2) for n, ps in sorted(concurrency.items())}
  return rows, running


def alone_times(intervals):
  """For (start, end) intervals (operations on any thread): the time each spent with no other
  interval open, and {number of open intervals: total time} over the span they cover. An
  operation that ran alone held up the step (no other operation could overlap it); time with
  two open ran two operations side by side."""
  edges = sorted([(s, 1, i) for i, (s, _) in enumerate(intervals)] +
                 [(e, -1, i) for i, (_, e) in enumerate(intervals)], key=lambda t: (t[0], t[1]))
  alone = [0] * len(intervals)
  concurrency = collections.Counter()
  open_ = set()
  last = None
  for t, kind, i in edges:
    if last is not None and t > last:
      concurrency[len(open_)] += t - last
      if len(open_) == 1:
        alone[next(iter(open_))] += t - last
    if kind == 1:
      open_.add(i)
    else:
      open_.discard(i)
    last = t
  return alone, dict(concurrency)


_TORCH_CATEGORIES = (
    ("optimizer", ("_foreach", "adam", "sgd", "_fused")),
    ("depthwise_conv", ("_depthwise", "thnn_conv_depthwise", "conv_depthwise")),
    ("convolution", ("conv", "mkldnn_convolution")),
    ("matmul", ("mm", "matmul", "linear", "bmm", "addmm", "baddbmm")),
    ("transcendental", ("gelu", "softmax", "exp", "log", "erf", "tanh", "sigmoid", "rsqrt")),
    ("reduction", ("sum", "mean", "layer_norm", "batch_norm", "norm", "var", "max", "min")),
    ("gather_scatter", ("gather", "scatter", "index")),
    ("copy_transpose", ("copy", "clone", "contiguous", "transpose", "permute", "cat", "view",
                        "reshape", "expand", "as_strided", "empty", "zero", "fill", "slice",
                        "select", "unbind", "split", "t", "flatten", "unsqueeze", "squeeze",
                        "pad", "roll")),
    ("elementwise", ("add", "mul", "div", "sub", "where", "neg", "bernoulli", "dropout", "pow",
                     "floor", "rand", "lerp", "sqrt", "clamp")),
)


def torch_category(name: str) -> str:
  short = name.split("::")[-1].lower()
  for category, keys in _TORCH_CATEGORIES:
    if any(short == k or short.startswith(k + "_") or k in short for k in keys if len(k) > 2) or \
        short in keys:
      return category
  return "other"


def torch_profile(args, images, target):
  import torch
  from torch.profiler import ProfilerActivity, profile

  tstep = classifier_step.torch_step(args.job, args)
  timg = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  ttarget = torch.from_numpy(target)
  for _ in range(args.warmup):
    tstep(timg, ttarget)
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(args.steps):
      tstep(timg, ttarget)
  rows = []
  for e in prof.key_averages():
    if e.self_cpu_time_total <= 0:
      continue
    rows.append({"op": e.key, "category": torch_category(e.key),
                 "ms_per_step": e.self_cpu_time_total / 1e3 / args.steps,
                 "count_per_step": e.count / args.steps})
  return rows


def summarise(side: str, rows: list[dict], args, meta: dict, running: dict | None = None):
  total = sum(r["ms_per_step"] for r in rows)
  by_cat = collections.defaultdict(float)
  alone = collections.defaultdict(float)
  for r in rows:
    by_cat[r["category"]] += r["ms_per_step"]
    alone[r["category"]] += r.get("alone_ms_per_step", 0.0)
  solo = {}
  for category in CATEGORIES:
    if category in by_cat:
      if running is not None:
        solo = {"alone_ms_per_step": round(alone[category], 2)}
      print(json.dumps({**meta, "side": side, "category": category,
                        "ms_per_step": round(by_cat[category], 2),
                        "share": round(by_cat[category] / total, 4), **solo}), flush=True)
  if running is not None:
    solo = {"alone_ms_per_step": round(sum(alone.values()), 2),
            "ms_per_step_with_n_running": running}
  print(json.dumps({**meta, "side": side, "category": "total", "ms_per_step": round(total, 2),
                    "share": 1.0, **solo}), flush=True)
  key = "alone_ms_per_step" if getattr(args, "sort", "time") == "alone" else "ms_per_step"
  for r in sorted(rows, key=lambda r: -r.get(key, 0.0))[:args.top]:
    print(json.dumps({**meta, "side": side, **{k: (round(v, 3) if isinstance(v, float) else v)
                                               for k, v in r.items()}}), flush=True)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--job", default="finetune", choices=("finetune", "linprobe"))
  ap.add_argument("--model", default="convvit_base")
  ap.add_argument("--img_size", type=int, default=224)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--dwconv_impl", default="auto", choices=("auto", "shift", "lax"),
                  help="the JAX model's depthwise conv (auto: shift on CPU)")
  ap.add_argument("--cpu_matmuls", default="auto", choices=xla_cpu.CPU_MATMULS,
                  help="the trainer's config.cpu_matmuls for the JAX step (Eigen's products are "
                       "not in the trace: see above)")
  ap.add_argument("--steps", type=int, default=2, help="profiled steps per side")
  ap.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
  ap.add_argument("--top", type=int, default=20, help="operations listed per side")
  ap.add_argument("--torch", default="on", choices=("on", "off"))
  ap.add_argument("--sort", default="time", choices=("time", "alone"),
                  help="order of the JAX operations listed: by their time, or by the time they "
                       "ran with no other operation beside them (what held the step up)")
  hostinfo.add_host_malloc_flag(ap)
  args = ap.parse_args(argv)
  host_malloc_reuse = hostinfo.apply_host_malloc(args)     # before JAX starts its backend
  for name in ("steps", "warmup", "top", "batch", "img_size"):
    if getattr(args, name) < (0 if name == "warmup" else 1):
      ap.error(f"--{name} {getattr(args, name)} is not valid: expected >= "
               f"{0 if name == 'warmup' else 1}")
  args.warmup = max(args.warmup, 1)    # the first step compiles
  dump_dir = dump_hlo_flags()
  rng = np.random.default_rng(0)
  images = rng.normal(size=(args.batch, args.img_size, args.img_size, 3)).astype(np.float32)
  target = rng.dirichlet(np.ones(1000), size=args.batch).astype(np.float32)
  meta = {"job": args.job, "model": args.model, "img_size": args.img_size, "batch": args.batch,
          "cpu": hostinfo.cpu_name(), "host_malloc_reuse": host_malloc_reuse}
  rows, running = jax_profile(args, images, target, dump_dir)
  summarise("jax", rows, args, meta, running)
  if args.torch == "on":
    summarise("torch", torch_profile(args, images, target), args, meta)


if __name__ == "__main__":
  main()
