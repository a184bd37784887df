"""The commands that use or drive whole runs: search, index, serve, and the ablation driver.

Imports flow one way: `fgir_jax.commands` -> `fgir_jax.train` (the training
stages and the run directory) -> the library core (`losses`, `mining`,
`metrics`, `index`, `models`, `data`, ...). Nothing below imports from here, and
the library never imports the web framework `serve` needs.
"""
