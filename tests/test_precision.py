"""config.dtype "auto": bfloat16 where the hardware computes in it (GPU/TPU, x86 CPUs with
AVX512-BF16 or AMX), float32 on other CPUs; decided without starting JAX, and the same dtype
reaches every job's model config."""

import pytest

from convmae_jax import configs, host_malloc
from convmae_jax.train import ConfigError, precision, validation
from convmae_jax.train.jobs import segment

CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
model name\t: {model}
flags\t\t: fpu vme sse sse2 avx avx2 fma {extra}
bogomips\t: 4000.00

processor\t: 1
flags\t\t: fpu vme sse sse2 avx avx2 fma {extra}
"""


def _cpuinfo(tmp_path, extra: str, name: str = "cpuinfo"):
  path = tmp_path / name
  path.write_text(CPUINFO.format(vendor="X", model="Y", extra=extra))
  return str(path)


def test_explicit_values_are_kept():
  assert precision.resolve("float32") == ("float32", "config.dtype='float32'")
  assert precision.resolve("bfloat16", environ={"JAX_PLATFORMS": "cpu"}) == (
      "bfloat16", "config.dtype='bfloat16'")


@pytest.mark.parametrize("extra,expected", [
    ("", "float32"),                                       # AVX2 only (AMD EPYC Zen 3)
    ("avx512f avx512bw avx512_vnni", "float32"),           # AVX-512 without bfloat16
    ("avx512f avx512_bf16 avx512_vnni", "bfloat16"),       # AMD EPYC Zen 4
    ("avx512f amx_bf16 amx_tile amx_int8", "bfloat16"),    # Intel Xeon with AMX
])
def test_auto_on_a_cpu_follows_its_bfloat16_flags(tmp_path, extra, expected):
  path = _cpuinfo(tmp_path, extra)
  dtype, why = precision.resolve("auto", environ={"JAX_PLATFORMS": "cpu"}, cpuinfo=path)
  assert dtype == expected
  if expected == "bfloat16":
    found = [f for f in ("amx_bf16", "avx512_bf16") if f in extra.split()]
    assert why == f"config.dtype='auto': CPU only, and this CPU has {found[0]}"
  else:
    assert why.startswith("config.dtype='auto': CPU only, and this CPU has no bfloat16 arithmetic")


def test_auto_without_cpuinfo_is_float32(tmp_path):
  assert precision.cpu_flags(str(tmp_path / "missing")) is None
  (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
  assert precision.cpu_flags(str(tmp_path / "arm")) is None
  for path in (tmp_path / "missing", tmp_path / "arm"):
    assert precision.resolve("auto", environ={"JAX_PLATFORMS": "cpu"}, cpuinfo=str(path))[0] == "float32"


@pytest.mark.parametrize("platforms", ["tpu", "cuda", "cuda,cpu"])
def test_auto_with_an_accelerator_is_bfloat16(tmp_path, platforms):
  path = _cpuinfo(tmp_path, "")                             # the host CPU does not matter
  assert precision.resolve("auto", environ={"JAX_PLATFORMS": platforms}, cpuinfo=path) == (
      "bfloat16", f"config.dtype='auto': JAX_PLATFORMS={platforms}")


def test_auto_with_an_accelerator_plugin_installed(tmp_path, monkeypatch):
  monkeypatch.setattr(host_malloc, "accelerator_plugins", lambda: ["jax_cuda12_plugin"])
  assert precision.resolve("auto", environ={}, cpuinfo=_cpuinfo(tmp_path, "")) == (
      "bfloat16", "config.dtype='auto': jax accelerator plugins installed: jax_cuda12_plugin")
  monkeypatch.setattr(host_malloc, "accelerator_plugins", lambda: [])
  assert precision.resolve("auto", environ={}, cpuinfo=_cpuinfo(tmp_path, ""))[0] == "float32"


def test_a_bad_value_names_it_and_the_accepted_ones():
  with pytest.raises(ValueError, match=r"config.dtype='float16' is not accepted; use one of "
                                       r"\['auto', 'float32', 'bfloat16'\]"):
    precision.resolve("float16")


@pytest.mark.parametrize("flags,expected", [({"avx2"}, "float32"),
                                            ({"avx2", "avx512_bf16"}, "bfloat16")])
def test_every_recipe_resolves_auto_into_its_model_config(monkeypatch, flags, expected):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setattr(precision, "cpu_flags", lambda *a, **k: set(flags))
  pre = configs.get_config("pretrain", "tiny")
  fine = configs.get_config("finetune", "tiny")
  lin = configs.get_config("linprobe", "tiny")
  seg = configs.get_config("segment")
  for c in (pre, fine, lin, seg):
    assert c.dtype == "auto"
  for c in (fine, lin):
    c.dataset, c.num_classes = "convmae_demo_digits", 10
  seg.dataset = "convmae_demo_segments"
  plans = [validation.validate_config(pre, num_devices=1, process_count=1),
           validation.validate_classification_config(fine, num_devices=1, process_count=1),
           validation.validate_classification_config(lin, num_devices=1, process_count=1),
           segment.validate_segmentation_config(seg, num_devices=1, process_count=1)]
  assert [p.model_overrides["dtype"] for p in plans] == [expected] * 4
  assert [getattr(p.model_config, "backbone", p.model_config).dtype for p in plans] == [expected] * 4
  # An explicit value is kept whatever the CPU.
  pre.dtype = "bfloat16" if expected == "float32" else "float32"
  assert validation.validate_config(pre, num_devices=1, process_count=1).model_config.dtype == pre.dtype


def test_a_bad_dtype_is_refused_by_every_job():
  pre, fine, seg = (configs.get_config("pretrain", "tiny"), configs.get_config("finetune", "tiny"),
                    configs.get_config("segment"))
  for c in (pre, fine, seg):
    c.dtype = "float16"
  match = r"config.dtype='float16' is not accepted; use one of \['auto', 'float32', 'bfloat16'\]"
  with pytest.raises(ConfigError, match=match):
    validation.validate_config(pre, num_devices=1, process_count=1)
  with pytest.raises(ConfigError, match=match):
    validation.validate_classification_config(fine, num_devices=1, process_count=1)
  with pytest.raises(ConfigError, match=match):
    segment.validate_segmentation_config(seg, num_devices=1, process_count=1)
