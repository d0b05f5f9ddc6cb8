"""The quickstart notebook runs top to bottom (every cell, in order, in a real kernel, CPU, with a
short pretraining run), so it never rots."""

import json
import os
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "convmae_jax_quickstart.ipynb")


def _text(cell) -> str:
  out = []
  for o in cell.get("outputs", []):
    if o.get("output_type") == "stream":
      out.append(o.get("text", ""))
    elif "data" in o and "text/plain" in o["data"]:
      out.append(o["data"]["text/plain"])
  return "".join(out)


def test_notebook_runs_every_cell(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  env_before = dict(os.environ)
  os.environ.update(CONVMAE_NOTEBOOK_STEPS="30", CONVMAE_NOTEBOOK_WORKDIR=str(tmp_path / "run"),
                    PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    JAX_PLATFORMS="cpu", TFDS_DATA_DIR=str(tmp_path / "tfds"))
  try:
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()                 # raises CellExecutionError on the first failing cell
  finally:
    os.environ.clear()
    os.environ.update(env_before)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.get("execution_count") for c in code), "a code cell did not run"
  errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors, errors
  # Pictures where pictures are promised: masks, before, after.
  pngs = sum(1 for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
  assert pngs >= 3, pngs
  text = "".join(_text(c) for c in code)
  m = re.search(r"step (\d+): loss ([0-9.]+) -> ([0-9.]+)", text)
  assert m and int(m.group(1)) == 30 and float(m.group(3)) < float(m.group(2)), text[-2000:]
  m = re.search(r"predictions max \|diff\| ([0-9.e+-]+)", text)
  assert m and float(m.group(1)) < 1e-4, text[-2000:]
  assert (tmp_path / "run" / "checkpoints").is_dir()
  # The notebook in the repo is stored without outputs.
  with open(NOTEBOOK) as f:
    stored = json.load(f)
  assert all(not c.get("outputs") for c in stored["cells"] if c["cell_type"] == "code")
