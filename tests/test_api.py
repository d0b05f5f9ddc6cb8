"""convmae_jax.load from every source, the reconstruction command, interop metadata and file
permissions, and main.py's refusals (exit 2, a message, no traceback)."""

import os
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import convmae_jax
from convmae_jax import checkpoints, models, visualize
from convmae_jax.api import read_images

torch = pytest.importorskip("torch")
from convmae_jax.interop.__main__ import main as cli_main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KW = dict(img_size=32, norm_pix_loss=False, mask_ratio=0.5)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """The same tiny ConvMAE (non-default norm_pix_loss and mask ratio) as a training-style workdir
  (step 7), a model-only checkpoint, a .pth and a .safetensors export."""
  tmp = tmp_path_factory.mktemp("sources")
  model = models.create("convmae_tiny", rngs=nnx.Rngs(3), **KW)
  meta = {"model_name": "convmae_tiny", "model_kwargs": model.config.to_dict()}
  checkpoints.save_model(tmp / "workdir", model, meta, step=7)
  checkpoints.save_model(tmp / "weights", model, meta)
  for suffix in ("pth", "safetensors"):
    assert cli_main(["export", "--workdir", str(tmp / "workdir"), "--out",
                     str(tmp / f"m.{suffix}")]) == 0
  return tmp, model


def test_load_from_each_source_gives_identical_outputs(sources):
  tmp, model = sources
  images = np.asarray(jax.random.normal(jax.random.key(0), (2, 32, 32, 3)))
  noise = np.asarray(jax.random.uniform(jax.random.key(1), (2, 4)))
  want = [np.asarray(x) for x in model(images, noise=noise)]
  loaded = {
      "workdir": convmae_jax.load(tmp / "workdir"),
      "workdir step 7": convmae_jax.load(tmp / "workdir", step=7),
      "model-only": convmae_jax.load(tmp / "weights"),
      "safetensors": convmae_jax.load(tmp / "m.safetensors"),
      # .pth keeps no config fields: norm_pix_loss and the mask ratio are given here.
      "pth": convmae_jax.load(tmp / "m.pth", norm_pix_loss=False, mask_ratio=0.5),
  }
  for name, m in loaded.items():
    assert isinstance(m, models.ConvMAE), name
    assert (m.config.norm_pix_loss, m.config.mask_ratio) == (False, 0.5), name
    got = [np.asarray(x) for x in m(images, noise=noise)]
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g, w, err_msg=name)
  with pytest.raises(FileNotFoundError, match="no such file"):
    convmae_jax.load(tmp / "missing.pth")
  with pytest.raises(FileNotFoundError):
    convmae_jax.load(tmp / "empty_folder")


def test_import_keeps_the_fields_an_export_stores_and_files_get_usual_permissions(sources, tmp_path):
  tmp, _ = sources
  old = os.umask(0o022)
  try:
    assert cli_main(["export", "--workdir", str(tmp / "weights"), "--out",
                     str(tmp_path / "p.safetensors")]) == 0
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(tmp_path / "p.safetensors").st_mode) == 0o644
  assert cli_main(["import", "--torch", str(tmp_path / "p.safetensors"), "--out",
                   str(tmp_path / "imp")]) == 0
  _, meta = checkpoints.load_model_state(tmp_path / "imp")
  assert meta["model_kwargs"]["norm_pix_loss"] is False and meta["model_kwargs"]["mask_ratio"] == 0.5
  # An explicit override still wins over the stored field.
  assert cli_main(["import", "--torch", str(tmp_path / "p.safetensors"), "--out",
                   str(tmp_path / "imp2"), "--mask_ratio", "0.75"]) == 0
  _, meta2 = checkpoints.load_model_state(tmp_path / "imp2")
  assert meta2["model_kwargs"]["mask_ratio"] == 0.75


def test_reconstruct_command_writes_the_models_prediction(sources, tmp_path):
  tmp, model = sources
  rng = np.random.default_rng(0)
  files = []
  for i, size in enumerate([(40, 50), (64, 48)]):
    path = tmp_path / f"img{i}.png"
    Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(path)
    files.append(str(path))
  out = tmp_path / "grid.png"
  from convmae_jax.reconstruct import main as rec_main
  assert rec_main(["--checkpoint", str(tmp / "weights"), "--out", str(out), "--seed", "4", *files]) == 0
  got = np.asarray(Image.open(out).convert("RGB"))
  # The same figure from the model: same images, same masks (seed 4), same layout.
  images = read_images(files, 32)
  noise = jax.random.uniform(jax.random.key(4), (2, model.num_patches))
  _, pred, mask = model(images, noise=noise)
  want = visualize.reconstruction_grid(images, np.asarray(pred), np.asarray(mask), patch_size=16,
                                       norm_pix_loss=False)
  assert got.shape == want.shape == (2 * 34 + 2, 4 * 34 + 2, 3)
  np.testing.assert_array_equal(got, want)
  # The masked panel shows exactly the kept half of the 4 patches of each image.
  assert int(np.asarray(mask).sum()) == 2 * 2
  # Bad input: exit 2 with a message.
  assert rec_main(["--checkpoint", str(tmp / "weights"), "--out", str(out), "nope.jpg"]) == 2
  assert rec_main(["--checkpoint", str(tmp / "weights"), "--out", str(tmp_path / "g.jpg"), *files]) == 2


def _main(*args, cwd):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_main_refuses_user_mistakes_with_exit_2_and_no_traceback(tmp_path):
  demo = os.path.join(ROOT, "configs", "demo.py")
  afile = tmp_path / "afile"
  afile.write_text("x")
  broken = tmp_path / "broken" / "checkpoints" / "3"
  broken.mkdir(parents=True)
  (broken / "junk").write_text("not a checkpoint")
  cases = [
      (["--config=" + os.path.join(ROOT, "configs", "nope.py"), f"--workdir={tmp_path / 'w1'}"],
       "no such file", "configs/pretrain.py"),
      ([f"--config={demo}", f"--workdir={tmp_path / 'w2'}", "--config.batch_sise=4"],
       "has no field 'batch_sise'", "Did you mean batch_size"),
      ([f"--config={demo}", f"--workdir={afile}"], "is a file", "give a folder"),
      ([f"--config={demo}", f"--workdir={tmp_path / 'w5'}", "--config.batch_size=abc"],
       "--config.batch_size=abc: not an int (the type of batch_size in", "now 32)"),
      ([f"--config={demo}", f"--workdir={tmp_path / 'w3'}", "--config.train_split=trian"],
       "split='trian' is not valid", "available splits are ['test', 'train']"),
      ([f"--config={demo}", f"--workdir={tmp_path / 'w4'}", f"--config.init_from={broken.parent.parent}"],
       "config.init_from=", str(broken.parent.parent)),
  ]
  for args, *messages in cases:
    proc = _main(*args, cwd=tmp_path)
    assert proc.returncode == 2, (args, proc.stderr[-3000:])
    for m in messages:
      assert m in proc.stderr, (args, m, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert not (tmp_path / "w1").exists() and not (tmp_path / "w2").exists()
  assert not (tmp_path / "w3" / "checkpoints").exists()
