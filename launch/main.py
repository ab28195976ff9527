r"""The command line of every stage, from a checkout:

    python -m launch.main --config=configs/quickstart.py --mode=simulate

The flags, the modes and the dispatch are `smsd_jax.cli`'s (the same as the installed
`smsd-jax` command); `python -m launch.main --help` lists them.
"""

from smsd_jax import cli

if __name__ == "__main__":
    cli.main()
