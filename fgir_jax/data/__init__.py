"""Data sources, decode cache and on-device input for fgir_jax."""
