r"""The command line of every stage and experiment, from a checkout:

    python -m launch.main --config=configs/quickstart.py --mode=simulate
    python -m launch.main --config=configs/study_fashion.py --mode=study

The flags and the stages are `smsd_jax.cli`'s (the same as the installed `smsd-jax` command);
the experiments' modes are `experiments.MODES`. `python -m launch.main --help` lists them.
"""

import experiments
from smsd_jax import cli

if __name__ == "__main__":
    cli.main(experiments.MODES)
