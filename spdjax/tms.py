"""``python -m spdjax.tms --variant=5-2 --seed=0``: train (or load) a cached TMS target.

The family itself lives in :mod:`spdjax.experiments.tms`; this module is its command line.
"""

from spdjax.experiments import target_training
from spdjax.experiments.tms import FAMILY

if __name__ == "__main__":
    target_training.main(FAMILY)
