"""``python -m dgpo_jax.launch``: see `dgpo_jax.launch.cli`."""

from dgpo_jax.launch.cli import run_main

if __name__ == "__main__":
    run_main()
