"""fgir_jax command line (the clone's entry point; installed, it is `fgir-jax`).

    python launch.py --config configs/demo.py --workdir runs/demo
    python launch.py --config configs/cub.py:runlocal --workdir runs/cub50 --config.data.root=DIR
    python launch.py --config demo --workdir runs/demo --mode search --query a.jpg

Every flag and mode: `python launch.py --help` and fgir_jax/cli.py.
"""

from fgir_jax.cli import run

if __name__ == "__main__":
  run()
