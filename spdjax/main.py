"""``python -m spdjax.main --config=configs/tms.py``: the command line of
:mod:`spdjax.cli.main` under its documented name."""

from spdjax.cli.main import run

if __name__ == "__main__":
    run()
