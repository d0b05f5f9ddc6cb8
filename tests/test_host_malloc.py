"""host_malloc: which processes reuse freed host memory, and that reusing it removes the page faults
of XLA:CPU's per-run allocations without changing a computed value."""

import json
import os
import subprocess
import sys

import pytest

from convmae_jax import host_malloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A child process: host_malloc.apply(MODE) (before or after JAX starts), then a program whose
# 100 MB output is allocated by every run and freed before the next; prints the minor page faults
# of the last twenty of forty runs, whether the options were set, the log line and a checksum of
# the output.
_CHILD = r"""
import json, resource, sys
mode, when = sys.argv[1], sys.argv[2]
sys.path.insert(0, sys.argv[3])
from convmae_jax import host_malloc
import jax, jax.numpy as jnp
if when == "late":
  jax.devices()
line = host_malloc.apply(mode)
x = jnp.arange(6144 * 4096, dtype=jnp.float32).reshape(6144, 4096) * 1e-6
f = jax.jit(lambda x: jnp.sin(x) * 2.0 + x)
faults = []
for i in range(40):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  y = f(x)
  y.block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  total = float(jnp.sum(y[::97, ::89]))
  y.delete()     # freed now, before the next run allocates
print(json.dumps({"faults": faults[20:], "reusing": host_malloc.reusing(), "line": line,
                  "total": total}))
"""


def _child(mode: str, when: str = "early") -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("GLIBC_TUNABLES", None)
  proc = subprocess.run([sys.executable, "-c", _CHILD, mode, when, ROOT], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux)")
def test_reuse_removes_the_page_faults_of_each_run_and_changes_no_value():
  system, reuse, late = _child("system"), _child("auto"), _child("auto", "late")
  pages = 6144 * 4096 * 4 // 4096        # the output's 4 KiB pages: 24,576
  print(f"\nminor faults per run: system {system['faults']}, reuse {reuse['faults']}, "
        f"auto after JAX started {late['faults']}")
  assert not system["reusing"] and reuse["reusing"] and not late["reusing"]
  assert "glibc malloc defaults (host_malloc='system')" in system["line"]
  assert "freed blocks are reused" in reuse["line"] and "JAX_PLATFORMS=cpu" in reuse["line"]
  assert "JAX's backend was already running" in late["line"]
  # glibc's defaults map each run's 100 MB output afresh (a fault per page), every run. Reused,
  # most runs fault nothing; some still grow the heap, when a small allocation has taken a piece of
  # the freed block first. That settles: on a loaded 2-core machine, 2-13 of the first twenty runs
  # faulted and 0-3 of the next twenty (24 children); runs 12-19 alone had up to 4 of 8.
  assert min(system["faults"]) >= pages // 2 and min(late["faults"]) >= pages // 2
  assert sum(f <= pages // 50 for f in reuse["faults"]) >= 14
  assert reuse["total"] == system["total"] == late["total"]


def test_resolve_auto_from_the_platforms_and_plugins(tmp_path, monkeypatch):
  assert host_malloc.resolve("auto", {"JAX_PLATFORMS": "cpu"}) == ("reuse", "JAX_PLATFORMS=cpu")
  assert host_malloc.resolve("auto", {"JAX_PLATFORMS": "tpu"}) == ("system", "JAX_PLATFORMS=tpu")
  assert host_malloc.resolve("auto", {"JAX_PLATFORMS": "cuda,cpu"})[0] == "system"
  assert host_malloc.resolve("reuse", {"JAX_PLATFORMS": "tpu"})[0] == "reuse"
  assert host_malloc.resolve("system", {})[0] == "system"
  # Without JAX_PLATFORMS, an installed GPU/TPU plugin of jax decides.
  monkeypatch.setattr(host_malloc, "accelerator_plugins", lambda: [])
  assert host_malloc.resolve("auto", {}) == ("reuse", "no GPU/TPU plugin of jax is installed")
  monkeypatch.setattr(host_malloc, "accelerator_plugins", lambda: ["jax_cuda12_plugin"])
  assert host_malloc.resolve("auto", {}) == (
      "system", "jax accelerator plugins installed: jax_cuda12_plugin")


def test_accelerator_plugins_are_found_by_name(tmp_path, monkeypatch):
  before = host_malloc.accelerator_plugins()
  for name in ("xla_cuda12", "some_other_plugin"):
    (tmp_path / "jax_plugins" / name).mkdir(parents=True)
    (tmp_path / "jax_plugins" / name / "__init__.py").write_text("")
  monkeypatch.syspath_prepend(str(tmp_path))
  found = host_malloc.accelerator_plugins()
  assert "xla_cuda12" in found and "some_other_plugin" not in found
  assert len(found) == len(before) + 1


def test_bad_value_names_it_and_the_accepted_ones():
  with pytest.raises(ValueError, match=r"host_malloc='jemalloc' is not accepted; use 'auto' "
                                       r"\(reuse freed host memory on CPU-only installs\), "
                                       r"'reuse' or 'system'"):
    host_malloc.resolve("jemalloc", {})
  assert host_malloc.check("reuse") == "reuse"
