"""``python -m spdjax.resid_mlp --variant=1 --seed=0``: train (or load) a cached ResidMLP target.

The family itself lives in :mod:`spdjax.experiments.resid_mlp`; this module is its command line.
"""

from spdjax.experiments import target_training
from spdjax.experiments.resid_mlp import FAMILY

if __name__ == "__main__":
    target_training.main(FAMILY)
