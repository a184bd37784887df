"""`python -m fgir_jax`: the fgir-jax command line (fgir_jax/cli.py)."""

from fgir_jax.cli import run

run()
