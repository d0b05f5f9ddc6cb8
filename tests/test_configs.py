"""Config modules and command-line files, config checks (before any compute), the lr schedule."""

import glob
import math
import os

import jax
import numpy as np
import pytest
from flax import nnx

from convmae_jax import configs, models
from convmae_jax.train import optim, precision, schedule, trainer, validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=None):
  return configs.get_config(name, arg)


def load_config_file(path_and_arg):
  """``--config=path[:arg]`` as main.py reads it (ml_collections loads the file by path)."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["prog", f"--config={path_and_arg}"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def test_config_modules_and_command_line_files_match():
  """convmae_jax/configs has the modules `NAMES` lists; configs/ has one command-line file each."""
  def stems(folder):
    return {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, *folder, "*.py"))}
  assert stems(["convmae_jax", "configs"]) - {"__init__"} == set(configs.NAMES)
  assert stems(["configs"]) == set(configs.NAMES)   # no configs/__init__.py: files, not a package


@pytest.mark.parametrize("name,arg", [
    ("pretrain", None), ("pretrain", "large"), ("demo", None), ("finetune", None),
    ("finetune", "small"), ("linprobe", "tiny"), ("evaluate", "large"), ("demo_finetune", None),
    ("demo_linprobe", None), ("demo_digits", None)])
def test_command_line_file_gives_the_package_config(name, arg):
  path = os.path.join(ROOT, "configs", f"{name}.py") + (f":{arg}" if arg else "")
  assert load_config_file(path).to_dict() == configs.get_config(name, arg).to_dict()


def test_get_config_by_name():
  assert configs.get_config("finetune", "large").model == "convvit_large"
  assert configs.get_config("demo_linprobe").job == "linprobe"
  with pytest.raises(ValueError, match=r"'demo\.py'; available: pretrain, fastconvmae, demo, demo_digits, finetune"):
    configs.get_config("demo.py")


def test_pretrain_config_is_the_official_recipe():
  c = load_config("pretrain")
  assert c.model == "convmae_base" and c.dataset == "imagenet2012"
  assert (c.blr, c.b1, c.b2, c.weight_decay, c.min_lr) == (1.5e-4, 0.9, 0.95, 0.05, 0.0)
  assert (c.num_epochs, c.warmup_epochs, c.mask_ratio, c.image_size) == (1600, 40, 0.75, 224)
  assert c.norm_pix_loss is True and tuple(c.crop_scale) == (0.2, 1.0)
  assert c.num_train_steps == -1 and c.mesh.data == -1 and c.mesh.fsdp == 1
  assert load_config("pretrain", "large").model == "convmae_large"
  with pytest.raises(ValueError, match="'gigantic'.*accepted"):
    load_config("pretrain", "gigantic")
  demo = load_config("demo")
  assert demo.dataset == "convmae_demo_photos" and demo.model == "convmae_tiny"
  assert demo.image_size % 16 == 0 and demo.image_size <= 96
  # Every config passes the checks on one device.
  for cfg in (c, demo):
    plan = validation.validate_config(cfg, num_devices=1, process_count=1)
    assert plan.mesh_shape == (1, 1)


@pytest.mark.parametrize("field,value,match", [
    ("mask_ratio", 0.0, r"mask_ratio=0\.0 .*strictly between 0 and 1"),
    ("mask_ratio", 1.2, r"mask_ratio=1\.2 .*strictly between 0 and 1"),
    ("image_size", 100, r"image_size=100 .*multiple of the model's total stride 16.*\[96, 112\]"),
    ("batch_size", 30, r"batch_size=30 .*not divisible by the data-parallel size 8.*\[24, 32\]"),
    ("model", "convmae_gigantic", r"model='convmae_gigantic' .*accepted: \[.*'convmae_base'"),
    ("dataset", "imagenet2013", r"dataset='imagenet2013' .*accepted: \['imagenet2012'"),
    ("dtype", "float16", r"dtype='float16' .*\['auto', 'float32', 'bfloat16'\]"),
])
def test_config_errors_name_the_value_before_any_compute(tmp_path, field, value, match):
  c = load_config("demo")
  c[field] = value
  with pytest.raises(ValueError, match=match):
    validation.validate_config(c, num_devices=8, process_count=1)


@pytest.mark.parametrize("field,value", [("mask_ratio", 1.2), ("image_size", 100),
                                         ("model", "convmae_gigantic"), ("dataset", "imagenet2013")])
def test_trainer_refuses_bad_config_before_writing_anything(tmp_path, field, value):
  c = load_config("demo")
  c[field] = value
  with pytest.raises(ValueError, match=repr(value).replace(".", r"\.")):
    trainer.train_and_evaluate(c, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


def test_mesh_errors():
  c = load_config("demo")
  c.mesh.data, c.mesh.fsdp = 4, 4
  with pytest.raises(ValueError, match=r"data=4 x fsdp=4 = 16 devices, but 8 are present"):
    validation.validate_config(c, num_devices=8, process_count=1)
  c.mesh.data, c.mesh.fsdp = -1, 3
  with pytest.raises(ValueError, match=r"fsdp=3 does not divide the 8 devices"):
    validation.validate_config(c, num_devices=8, process_count=1)
  c.mesh.data, c.mesh.fsdp = -1, 2
  assert validation.validate_config(c, num_devices=8, process_count=1).mesh_shape == (4, 2)
  c.grad_accum_steps = 3
  with pytest.raises(ValueError, match=r"grad_accum_steps=3"):
    validation.validate_config(c, num_devices=8, process_count=1)


def test_lr_schedule_matches_closed_form():
  c = load_config("pretrain")
  n_examples = 1_281_167
  total, warmup, spe = schedule.schedule_lengths(c, n_examples)
  assert spe == pytest.approx(n_examples / 3072)
  assert total == math.ceil(1600 * spe) and warmup == pytest.approx(40 * spe)
  lr = schedule.make_schedule(c, total, warmup)
  peak = 1.5e-4 * 3072 / 256
  assert peak == pytest.approx(1.8e-3)

  def closed_form(step):  # util/lr_sched.py with epoch = step / steps_per_epoch
    epoch = step / spe
    if epoch < 40:
      return peak * epoch / 40
    return peak * 0.5 * (1 + math.cos(math.pi * (epoch - 40) / (1600 - 40)))

  steps = [0, 1, 1000, int(warmup), int(warmup) + 1, 100_000, 400_000, total - 1, total]
  got = np.array([float(lr(s)) for s in steps])
  want = np.array([closed_form(s) for s in steps])
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-12)
  assert float(lr(0)) == 0.0
  assert float(lr(warmup)) == pytest.approx(peak, rel=1e-6)      # peak at warmup end
  mid = warmup + (total - warmup) / 2
  assert float(lr(mid)) == pytest.approx(peak / 2, rel=1e-4)     # half-cosine midpoint
  assert float(lr(total)) == pytest.approx(0.0, abs=1e-12)


def test_weight_decay_set_is_the_official_one():
  model = nnx.eval_shape(lambda: models.create("convmae_tiny", rngs=nnx.Rngs(0), img_size=32))
  params = nnx.state(model, nnx.Param)
  mask = nnx.to_pure_dict(optim.weight_decay_mask(params))
  assert mask["mask_token"] is True                              # (1, 1, D): decayed, as official
  assert mask["blocks3"][0]["attn"]["qkv"]["kernel"] is True
  assert mask["blocks1"][0]["attn"]["kernel"] is True             # depthwise 5x5 kernel
  assert mask["blocks3"][0]["attn"]["qkv"]["bias"] is False
  assert mask["norm"]["scale"] is False and mask["patch_embed1"]["norm"]["bias"] is False
  assert "pos_embed" not in mask and "decoder_pos_embed" not in mask  # frozen: not optimized
  flat = jax.tree.leaves(mask)
  assert sum(flat) == sum(1 for p in jax.tree.leaves(params) if p.ndim >= 2)


def test_model_kwargs_placeholders_override_only_what_is_set():
  c = load_config("pretrain", "small")
  assert c.dtype == "auto"
  assert validation.model_overrides(c) == {"img_size": 224, "mask_ratio": 0.75,
                                           "norm_pix_loss": True,
                                           "dtype": precision.resolve("auto")[0]}
  c.model_kwargs.depths = (1, 1, 3)
  c.model_kwargs.decoder_depth = 2
  kwargs = validation.model_overrides(c)
  assert kwargs["depths"] == (1, 1, 3) and kwargs["decoder_depth"] == 2
  cfg = models.config_for(c.model, **kwargs)
  assert cfg.depths == (1, 1, 3) and cfg.embed_dims == (128, 256, 384)  # the rest from "small"
  with pytest.raises(TypeError):
    c.model_kwargs.depths = "three"                    # typed placeholders refuse wrong types


def test_model_kwargs_override_from_the_command_line():
  """`--config.model_kwargs.FIELD=...` works although the config is locked."""
  from absl import flags
  from ml_collections import config_flags
  path = os.path.join(ROOT, "configs", "demo.py")
  argv = ["prog", f"--config={path}", "--config.model_kwargs.embed_dims=(16,24,32)",
          "--config.model_kwargs.decoder_depth=3"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)   # main.py: the same flag, reading sys.argv
  fv(argv)
  assert tuple(fv.config.model_kwargs.embed_dims) == (16, 24, 32)
  assert validation.model_overrides(fv.config)["decoder_depth"] == 3


def test_every_field_the_training_code_reads_is_declared():
  """config.get("x"), config.x and config["x"] in convmae_jax/train/ (its jobs and evaluators
  included) name declared fields."""
  import glob
  import re
  declared = set()
  for name in ("pretrain", "finetune", "linprobe", "segment"):
    declared |= set(configs.get_config(name).keys())
  read = set()
  for path in glob.glob(os.path.join(ROOT, "convmae_jax", "train", "**", "*.py"), recursive=True):
    with open(path) as f:
      src = f.read()
    read |= set(re.findall(r"config\.get\(\"([a-z_0-9]+)\"", src))
    read |= set(re.findall(r"config\[\"([a-z_0-9]+)\"\]", src))
    read |= {m for m in re.findall(r"\bconfig\.([a-z_][a-z_0-9]*)\b", src)
             if m not in ("get", "to_dict", "to_json_best_effort", "unlocked", "keys", "items", "json")}
  missing = sorted(read - declared)
  assert not missing, f"read but not declared in any config: {missing}"
