"""Config checks that run before anything is compiled or computed.

Each error names the config field, the bad value and what would be accepted.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

from convmae_jax import host_malloc, models
from convmae_jax.train.errors import ConfigError
from convmae_jax.train import sharding as sharding_lib
from convmae_jax.train import precision, xla_cpu

# The datasets this project documents; any other registered TFDS image dataset is accepted too.
KNOWN_DATASETS = ("imagenet2012", "convmae_demo_photos", "convmae_demo_digits")
DTYPES = precision.DTYPES           # config.dtype: "auto" resolves per machine (train/precision.py)
# config.nonfinite: what a non-finite loss does (train/metrics.py, train/rollback.py).
NONFINITE = ("stop", "skip", "rollback")
# Top-level config fields that set model fields; model_kwargs must not set them as well.
_MODEL_FIELDS_FROM_CONFIG = {"img_size": "image_size", "mask_ratio": "mask_ratio",
                             "norm_pix_loss": "norm_pix_loss", "dtype": "dtype",
                             "complementary_masks": "complementary_masks"}


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """What the checks resolved: mesh axis sizes, the model's create() overrides and its config."""
  mesh_shape: tuple[int, int]
  model_overrides: dict[str, Any]
  model_config: Any


def _base_dataset_name(name: str) -> str:
  return str(name).split(":")[0].split("/")[0].strip()


def _is_registered_dataset(name: Any) -> bool:
  if not isinstance(name, str) or not name.strip():
    return False
  base = _base_dataset_name(name)
  if base in KNOWN_DATASETS:
    return True
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  import convmae_jax.data  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  try:
    tfds.builder_cls(base)
    return True
  except Exception:  # DatasetNotFoundError and malformed names
    return False


def compute_dtype(config) -> str:
  """The model's compute dtype for ``config.dtype`` ("auto" resolved for this process, see
  ``precision.resolve``); a ConfigError naming a value that is not accepted."""
  try:
    return precision.resolve(config.dtype)[0]
  except ValueError as e:
    raise ConfigError(str(e)) from None


def model_overrides(config) -> dict[str, Any]:
  """The keyword overrides passed to ``models.create(config.model, ...)``."""
  # None = the model size's own value (configs declare every size field as a typed placeholder).
  kwargs = {k: v for k, v in dict(config.get("model_kwargs", None) or {}).items() if v is not None}
  for model_field, config_field in _MODEL_FIELDS_FROM_CONFIG.items():
    if model_field in kwargs and kwargs[model_field] != config.get(config_field):
      raise ConfigError(
          f"config.model_kwargs.{model_field}={kwargs[model_field]!r} conflicts with "
          f"config.{config_field}={config[config_field]!r}; set config.{config_field} only.")
  for key, value in list(kwargs.items()):
    if isinstance(value, list):
      kwargs[key] = tuple(value)
  kwargs.update(img_size=config.image_size, mask_ratio=config.mask_ratio,
                norm_pix_loss=config.norm_pix_loss, dtype=compute_dtype(config))
  if config.get("complementary_masks", False):
    kwargs["complementary_masks"] = True
  return kwargs


def _check_image_size(size, stride: int) -> None:
  if not isinstance(size, int) or isinstance(size, bool) or size < stride or size % stride:
    lower = (int(size) // stride) * stride if isinstance(size, (int, float)) else 0
    near = [v for v in (lower, lower + stride) if v >= stride]
    raise ConfigError(f"config.image_size={size!r} is not accepted: it must be a positive multiple of "
                      f"the model's total stride {stride}; nearest accepted: {near}.")


def _positive_int(config, name: str, *, allow_unset: bool = False) -> None:
  value = config.get(name)
  if allow_unset and value == -1:
    return
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    extra = " or -1 (unset)" if allow_unset else ""
    raise ConfigError(f"config.{name}={value!r} is not accepted: expected a positive integer{extra}.")


def _check_mesh_batch_steps(config, num_devices: int, process_count: int) -> tuple[int, int]:
  """Mesh, global batch, gradient accumulation, step counts, intervals, lr fields; the mesh shape."""
  # Mesh and batch.
  mesh_shape = sharding_lib.resolve_mesh_shape(config.mesh.data, config.mesh.fsdp, num_devices)
  data_parallel = mesh_shape[0] * mesh_shape[1]
  _positive_int(config, "batch_size")
  _positive_int(config, "grad_accum_steps")
  batch, accum = config.batch_size, config.grad_accum_steps
  if batch % data_parallel:
    ok = [b for b in ((batch // data_parallel) * data_parallel,
                      (batch // data_parallel + 1) * data_parallel) if b > 0]
    raise ConfigError(f"config.batch_size={batch} (global) is not divisible by the data-parallel size "
                     f"{data_parallel} (mesh data={mesh_shape[0]} x fsdp={mesh_shape[1]}); "
                     f"accepted: a multiple of {data_parallel}, e.g. {ok}.")
  if batch % process_count:
    raise ConfigError(f"config.batch_size={batch} is not divisible by the {process_count} processes.")
  if batch % accum or (batch // accum) % data_parallel:
    raise ConfigError(f"config.batch_size={batch} with grad_accum_steps={accum}: each micro-batch "
                     f"(batch_size / grad_accum_steps) must be a whole multiple of the data-parallel "
                     f"size {data_parallel}; accepted batch sizes: multiples of {accum * data_parallel}.")

  # Step counts and intervals.
  _positive_int(config, "num_train_steps", allow_unset=True)
  if config.num_train_steps == -1:
    _positive_int(config, "num_epochs")
  _positive_int(config, "log_every_steps")
  _positive_int(config, "checkpoint_every_steps")
  if config.get("keep_checkpoints", 1) is not None and config.get("keep_checkpoints", 1) < 1:
    raise ConfigError(f"config.keep_checkpoints={config.keep_checkpoints!r}: expected >= 1.")
  if config.warmup_epochs < 0 or config.get("warmup_steps", -1) < -1:
    raise ConfigError(f"config.warmup_epochs={config.warmup_epochs!r} / warmup_steps="
                     f"{config.get('warmup_steps', -1)!r}: expected >= 0 (warmup_steps -1 = from epochs).")
  for name in ("blr", "weight_decay", "min_lr"):
    if config.get(name, 0.0) < 0:
      raise ConfigError(f"config.{name}={config.get(name)!r} must be >= 0.")
  if config.get("nonfinite", "stop") not in NONFINITE:
    raise ConfigError(f"config.nonfinite={config.nonfinite!r} is not accepted; use 'stop', 'skip' "
                      "or 'rollback'.")
  if config.get("nonfinite", "stop") == "skip":
    _positive_int(config, "max_consecutive_skips")
  if config.get("nonfinite", "stop") == "rollback":
    _int_at_least(config, "rollback_fp32_steps", 0, 0,
                  "an integer >= 0 (steps after the restored checkpoint computed in float32; "
                  "0 = keep the dtype)")
    _int_at_least(config, "max_rollbacks", 3, 1,
                  "an integer >= 1 (rollbacks in a row before the run stops)")
  fraction = config.get("max_bad_fraction", 1.0)
  if (not isinstance(fraction, (int, float)) or isinstance(fraction, bool)
      or not 0.0 <= float(fraction) <= 1.0):
    raise ConfigError(f"config.max_bad_fraction={fraction!r} is not accepted: expected a fraction "
                      "in [0, 1] of the examples read that may be undecodable (e.g. 0.001; 1 = never "
                      "stop).")
  try:
    xla_cpu.check(config.get("cpu_matmuls", "auto"))
    host_malloc.check(config.get("host_malloc", "auto"))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  timeout = config.get("peer_timeout_s", 120.0)
  if (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
      or not math.isfinite(float(timeout)) or float(timeout) < 1.0):
    raise ConfigError(f"config.peer_timeout_s={timeout!r} is not accepted: expected seconds >= 1 "
                      "(how long the other processes wait for one that stopped answering; e.g. 120).")
  for name in ("b1", "b2"):
    if name in config and not 0.0 <= config[name] < 1.0:
      raise ConfigError(f"config.{name}={config[name]!r} must lie in [0, 1).")

  return mesh_shape


def _int_at_least(config, name: str, default: int, minimum: int, accepted: str) -> int:
  value = config.get(name, default)
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ConfigError(f"config.{name}={value!r} is not accepted: expected {accepted}.")
  return value


def _check_knn(config, mesh_shape: tuple[int, int], process_count: int) -> None:
  """The k-NN monitor's fields (``knn_*``, configs/pretrain.py); the dataset only when it is on."""
  every = _int_at_least(config, "knn_every_steps", 0, 0,
                        "an integer >= 0 (steps between k-NN evaluations; 0 = off)")
  _int_at_least(config, "knn_k", 20, 1, "an integer >= 1 (neighbours per query; DINO uses 20)")
  temperature = config.get("knn_temperature", 0.07)
  if (not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
      or not math.isfinite(float(temperature)) or float(temperature) <= 0):
    raise ConfigError(f"config.knn_temperature={temperature!r} is not accepted: expected a number "
                      "> 0 (votes are exp(cosine similarity / temperature); DINO uses 0.07).")
  for name in ("knn_reference_per_class", "knn_query_per_class"):
    _int_at_least(config, name, 10, 1, "an integer >= 1 (examples of each class)")
  batch = _int_at_least(config, "knn_batch_size", 256, 1, "a positive integer (global batch)")
  data_parallel = mesh_shape[0] * mesh_shape[1]
  if batch % data_parallel or batch % process_count:
    raise ConfigError(f"config.knn_batch_size={batch} is not accepted: expected a multiple of the "
                      f"{data_parallel} data-parallel devices and the {process_count} processes.")
  for name in ("knn_reference_split", "knn_query_split"):
    split = config.get(name, "")
    if not isinstance(split, str) or not split.strip():
      raise ConfigError(f"config.{name}={split!r} is not accepted: expected a TFDS split such as "
                        "'train', 'validation' or 'test'.")
  dataset = config.get("knn_dataset", "")
  if every > 0 and dataset and not _is_registered_dataset(dataset):
    raise ConfigError(f"config.knn_dataset={dataset!r} is not a known dataset; accepted: \"\" (the "
                      "pretraining dataset), 'imagenet2012', 'convmae_demo_digits' or another TFDS "
                      "image classification dataset name.")


def validate_config(config, *, num_devices: int | None = None,
                    process_count: int | None = None) -> RunPlan:
  """Checks a pretraining config; raises ValueError before any compute. Returns the resolved plan."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count

  # Model name: a registered pretraining (convmae_*) model.
  pretrain_names = [n for n in models.names() if n.startswith("convmae_")]
  if config.model not in pretrain_names:
    raise ConfigError(f"config.model={config.model!r} is not a known pretraining model; accepted: "
                     f"{pretrain_names}.")

  # Dataset: a registered TFDS name (a lookup in the registry, nothing is read).
  if not _is_registered_dataset(config.dataset):
    raise ConfigError(f"config.dataset={config.dataset!r} is not a known dataset; accepted: "
                     f"{list(KNOWN_DATASETS)} or another TFDS image dataset name.")

  # Masking.
  ratio = config.mask_ratio
  if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 < float(ratio) < 1.0:
    raise ConfigError(f"config.mask_ratio={ratio!r} is not accepted: it must lie strictly between "
                     "0 and 1 (the recipe uses 0.75).")

  # Image size: a multiple of the total patch stride of the model.
  # None = the model size's own value (configs declare every size field as a typed placeholder).
  kwargs = {k: v for k, v in dict(config.get("model_kwargs", None) or {}).items() if v is not None}
  default_patches = {f.name: f.default for f in dataclasses.fields(models.ConvMAEConfig)}["patch_sizes"]
  stride = math.prod(kwargs.get("patch_sizes", default_patches))
  _check_image_size(config.image_size, stride)

  compute_dtype(config)

  mesh_shape = _check_mesh_batch_steps(config, num_devices, process_count)
  _check_knn(config, mesh_shape, process_count)

  # The model's own checks (sizes, heads, ...), still without building anything.
  overrides = model_overrides(config)
  try:
    model_config = models.config_for(config.model, **overrides)
  except TypeError as e:  # unknown model_kwargs field
    raise ConfigError(f"config.model_kwargs: {e}") from None
  except ValueError as e:  # sizes, heads, complementary masks that do not fit
    raise ConfigError(f"config.model={config.model!r} with these settings: {e}") from None

  return RunPlan(mesh_shape=mesh_shape, model_overrides=overrides, model_config=model_config)


JOBS = ("pretrain", "finetune", "linprobe", "evaluate", "segment")
# Top-level classification config fields that set ConvViT fields.
_CLASSIFIER_FIELDS_FROM_CONFIG = {"img_size": "image_size", "num_classes": "num_classes",
                                  "global_pool": "global_pool", "drop_path_rate": "drop_path_rate",
                                  "dtype": "dtype"}


def validate_classification_config(config, *, num_devices: int | None = None,
                                   process_count: int | None = None) -> RunPlan:
  """Checks a fine-tuning, linear-probe or evaluation config before any compute; the resolved plan."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  job = config.get("job", "pretrain")
  if job not in JOBS:
    raise ConfigError(f"config.job={job!r} is not accepted; use one of {list(JOBS)}.")
  names = [n for n in models.names() if models.family(n) == "convvit"]
  if config.model not in names:
    raise ConfigError(f"config.model={config.model!r} is not a classifier; accepted: {names} "
                      "(the fine-tuning, linear-probe and evaluation jobs use ConvViT).")
  if not _is_registered_dataset(config.dataset):
    raise ConfigError(f"config.dataset={config.dataset!r} is not a known dataset; accepted: "
                      f"{list(KNOWN_DATASETS)} or another TFDS image classification dataset name.")
  compute_dtype(config)
  kwargs = {k: v for k, v in dict(config.get("model_kwargs", None) or {}).items() if v is not None}
  for model_field, config_field in _CLASSIFIER_FIELDS_FROM_CONFIG.items():
    if model_field in kwargs and kwargs[model_field] != config[config_field]:
      raise ConfigError(f"config.model_kwargs.{model_field}={kwargs[model_field]!r} conflicts with "
                        f"config.{config_field}={config[config_field]!r}; set config.{config_field} only.")
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  kwargs.update({m: config[c] for m, c in _CLASSIFIER_FIELDS_FROM_CONFIG.items()})
  kwargs["dtype"] = compute_dtype(config)
  kwargs["head_batchnorm"] = job == "linprobe"
  stride = math.prod(kwargs.get("patch_sizes", (4, 2, 2)))
  _check_image_size(config.image_size, stride)
  if not isinstance(config.num_classes, int) or config.num_classes < 1:
    raise ConfigError(f"config.num_classes={config.num_classes!r}: expected a positive integer (the "
                      "dataset's number of classes).")
  if not 0.0 <= float(config.drop_path_rate) < 1.0:
    raise ConfigError(f"config.drop_path_rate={config.drop_path_rate!r} must lie in [0, 1).")
  if not 0.0 < float(config.get("crop_pct", 0.875)) <= 1.0:
    raise ConfigError(f"config.crop_pct={config.crop_pct!r} must lie in (0, 1] (the eval resize is "
                      "image_size / crop_pct).")
  _positive_int(config, "eval_batch_size")
  mesh_shape = sharding_lib.resolve_mesh_shape(config.mesh.data, config.mesh.fsdp, num_devices)
  if config.eval_batch_size % (mesh_shape[0] * mesh_shape[1]) or config.eval_batch_size % process_count:
    raise ConfigError(f"config.eval_batch_size={config.eval_batch_size} must be a multiple of the "
                      f"{mesh_shape[0] * mesh_shape[1]} data-parallel devices and the "
                      f"{process_count} processes.")

  if job != "evaluate":
    mesh_shape = _check_mesh_batch_steps(config, num_devices, process_count)
    _positive_int(config, "eval_every_steps", allow_unset=True)
    if job == "finetune":
      if not 0.0 < float(config.layer_decay) <= 1.0:
        raise ConfigError(f"config.layer_decay={config.layer_decay!r} must lie in (0, 1] (1 = no decay).")
      for name in ("mixup", "cutmix"):
        if config[name] < 0:
          raise ConfigError(f"config.{name}={config[name]!r} must be >= 0 (0 = off).")
      for name in ("mixup_prob", "mixup_switch_prob", "label_smoothing", "reprob"):
        if not 0.0 <= float(config[name]) <= 1.0:
          raise ConfigError(f"config.{name}={config[name]!r} must lie in [0, 1].")
      mixing = config.mixup_prob > 0 and (config.mixup > 0 or config.cutmix > 0)
      if mixing and config.batch_size % 2:
        raise ConfigError(f"config.batch_size={config.batch_size} is odd: mixup/cutmix mix the batch "
                          "with its reverse and need an even batch; use an even batch_size, or "
                          "--config.mixup_prob=0.")
      if config.get("rand_augment", ""):
        from convmae_jax.data import augment  # pylint: disable=import-outside-toplevel
        try:
          augment.parse_rand_augment(config.rand_augment)
        except ValueError as e:
          raise ConfigError(f"config.rand_augment={config.rand_augment!r}: {e}") from None
  try:
    model_config = models.config_for(config.model, **kwargs)
  except TypeError as e:
    raise ConfigError(f"config.model_kwargs: {e}") from None
  except ValueError as e:
    raise ConfigError(f"model {config.model}: {e}") from None
  return RunPlan(mesh_shape=mesh_shape, model_overrides=kwargs, model_config=model_config)


# Model fields that decide the parameters' shapes; another value cannot resume a checkpoint.
_SHAPE_FIELDS = ("img_size", "in_chans", "patch_sizes", "embed_dims", "depths", "num_heads",
                 "mlp_ratios", "decoder_embed_dim", "decoder_depth", "decoder_num_heads",
                 "decoder_mlp_ratio", "num_classes", "global_pool", "head_batchnorm")


def check_resume(meta: dict, config, model_config, directory) -> None:
  """ConfigError, before anything is restored, when the checkpoint in ``directory`` was written by
  another model, or with another batch size or seed (unless ``config.allow_resume_changes``)."""
  problems = []
  if meta.get("model_name") not in (None, config.model):
    problems.append(f"model {meta.get('model_name')!r} (now {config.model!r})")
  saved = meta.get("model_kwargs") or {}
  now = model_config.to_dict()
  for field in _SHAPE_FIELDS:
    if field in saved and field in now and saved[field] != now[field]:
      problems.append(f"model field {field}={saved[field]!r} (now {now[field]!r})")
  model_problems = list(problems)
  for field in ("batch_size", "seed"):
    if field in meta and meta[field] != config[field]:
      problems.append(f"{field}={meta[field]!r} (now {config[field]!r})")
  if not problems:
    return
  if not model_problems and config.get("allow_resume_changes", False):
    return
  fix = ("use another --workdir for another model" if model_problems else
         "use the checkpoint's values, another --workdir, or --config.allow_resume_changes=True to "
         "continue with the new ones (the run then differs from the original)")
  raise ConfigError(f"The checkpoint in {directory} (step {meta.get('step')}) was written with "
                    + ", ".join(problems) + f"; {fix}.")
