"""``python -m spdjax.harvest --workdir=DIR``: the command line of
:mod:`spdjax.cli.harvest` under its documented name."""

from spdjax.cli.harvest import run

if __name__ == "__main__":
    run()
