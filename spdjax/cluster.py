"""``python -m spdjax.cluster --workdir=DIR``: the command line of :mod:`spdjax.cli.cluster`
under its documented name."""

from spdjax.cli.cluster import run

if __name__ == "__main__":
    run()
