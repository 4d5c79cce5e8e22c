"""`python -m allspark_jax`: the train / eval / predict command (`allspark_jax.commands.main`)."""
from allspark_jax.commands import main

if __name__ == "__main__":
    main.run()
