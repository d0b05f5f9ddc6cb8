"""convmae-jax: ConvMAE (masked convolution meets masked autoencoders) in JAX/Flax NNX.

    import convmae_jax
    model = convmae_jax.load("runs/convmae_base")        # workdir, checkpoint, .pth or .safetensors
    grid = convmae_jax.reconstruct(model, ["photo.jpg"], out="grid.png")

Subpackages: ``models``, ``data``, ``train``, ``interop``, ``configs``; nothing heavy is imported
until a name is used.
"""

__version__ = "0.1.0"

_LAZY = {"load": "convmae_jax.api", "reconstruct": "convmae_jax.api"}


def __getattr__(name: str):
  if name in _LAZY:
    import importlib
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'convmae_jax' has no attribute {name!r}")


__all__ = ["load", "reconstruct", "__version__"]
