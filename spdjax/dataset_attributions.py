"""``python -m spdjax.dataset_attributions --workdir=DIR``: the command line of
:mod:`spdjax.cli.dataset_attributions` under its documented name."""

from spdjax.cli.dataset_attributions import run

if __name__ == "__main__":
    run()
