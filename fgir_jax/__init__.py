"""fgir_jax: fine-grained image retrieval with deep hashing in JAX/Flax.

Import the parts you need; nothing here imports TensorFlow:

    from fgir_jax import losses, class_losses, mining, metrics
"""

__version__ = "0.1.0"
