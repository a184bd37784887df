"""The experiment configs; installed with the package as `fgir_jax.configs` (one copy).

Each module has `get_config(arg=None)`; `--config demo` (a packaged name) and
`--config configs/demo.py` (a path, in a clone) load the same file.
"""
