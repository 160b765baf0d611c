"""``python -m spdjax.attribution_graph --workdir=DIR --prompt=TEXT``: the command line of
:mod:`spdjax.cli.attribution_graph` under its documented name."""

from spdjax.cli.attribution_graph import run

if __name__ == "__main__":
    run()
