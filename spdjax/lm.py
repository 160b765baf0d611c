"""``python -m spdjax.lm --variant=ih --seed=0``: train (or load) a cached transformer target.

``--variant=bytes`` first builds the standard-library byte corpus (once, next to the target
cache). The family itself lives in :mod:`spdjax.experiments.lm`; this module is its command line.
"""

from spdjax.experiments import target_training
from spdjax.experiments.lm import FAMILY

if __name__ == "__main__":
    target_training.main(FAMILY)
