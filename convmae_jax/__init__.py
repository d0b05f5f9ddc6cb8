"""convmae-jax: ConvMAE (masked convolution meets masked autoencoders) in JAX/Flax NNX."""

__version__ = "0.1.0"
