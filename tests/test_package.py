"""The installable package: pyproject.toml builds, and the installed tree works without the repo.

Offline: pip builds the wheel with the setuptools of the running environment (no build isolation,
no index, no dependencies) and installs it into a temporary folder, which is then the only extra
entry of a fresh interpreter's path, started in another folder.
"""

import glob
import os
import shutil
import subprocess
import sys
import textwrap

from convmae_jax import configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Not part of a clone, or large: left out of the copy the build runs in.
_TOP_LEVEL_SKIP = {".git", ".venv", "venv", ".pytest_cache", "build", "dist", "workdirs", "tmp"}

_CHECK = textwrap.dedent("""
    import os, sys
    import convmae_jax, convmae_jax.configs as c
    print(convmae_jax.__file__)
    print(c.get_config("demo").model)
    for name in c.NAMES:
      c.get_config(name)                     # every config module imports from the installed tree
      print(sys.modules["convmae_jax.configs." + name].__file__)
""")


def _copy_source(dst):
  """The repository as a clone has it, so that building never writes into the work tree."""
  def ignore(folder, names):
    skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
    if os.path.samefile(folder, ROOT):
      skip |= _TOP_LEVEL_SKIP & set(names)
    return skip
  shutil.copytree(ROOT, dst, ignore=ignore)


def _package_files(root):
  """Relative paths of the package's .py files under ``root``."""
  pattern = os.path.join(root, "convmae_jax", "**", "*.py")
  return {os.path.relpath(p, root) for p in glob.glob(pattern, recursive=True)}


def test_installs_offline_and_imports_without_the_repo(tmp_path):
  src, target, elsewhere = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
  _copy_source(src)
  elsewhere.mkdir()
  pip = subprocess.run(
      [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
       "--disable-pip-version-check", "--quiet", "--target", str(target), str(src)],
      capture_output=True, text=True, timeout=300)
  assert pip.returncode == 0, pip.stdout + pip.stderr

  # Every module of the package was installed, config modules included.
  assert _package_files(ROOT) == _package_files(target)
  for name in configs.NAMES:
    assert (target / "convmae_jax" / "configs" / f"{name}.py").is_file(), name

  # PYTHONPATH = the install only; cwd elsewhere, so neither the repo nor "" can supply the package.
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(PYTHONPATH=str(target), PYTHONNOUSERSITE="1")
  proc = subprocess.run([sys.executable, "-c", _CHECK], cwd=elsewhere, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  lines = proc.stdout.split()
  assert lines[0] == str(target / "convmae_jax" / "__init__.py")
  assert lines[1] == "convmae_tiny"
  assert lines[2:] == [str(target / "convmae_jax" / "configs" / f"{n}.py") for n in configs.NAMES]


def test_pyproject_names_the_package_version():
  """pyproject.toml and convmae_jax.__version__ give one version."""
  import tomllib  # pylint: disable=import-outside-toplevel
  import convmae_jax  # pylint: disable=import-outside-toplevel
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  assert project["name"] == "convmae-jax" and project["version"] == convmae_jax.__version__
  assert not any(d.startswith("torch") for d in project["dependencies"])   # interop extra only
