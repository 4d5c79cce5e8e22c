"""AllSpark in JAX from a checkout: `python main.py --config configs/demo.py --workdir /tmp/demo`.

The command itself is `allspark_jax.commands.main` (also `python -m allspark_jax` and the console
script `allspark-jax`); its docstring lists the modes and flags.
"""
from allspark_jax.commands import main

if __name__ == "__main__":
    main.run()
