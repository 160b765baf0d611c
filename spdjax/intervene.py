"""``python -m spdjax.intervene --workdir=DIR --prompt=TEXT --ablate=site:idx,...``: the command
line of :mod:`spdjax.cli.intervene` under its documented name."""

from spdjax.cli.intervene import run

if __name__ == "__main__":
    run()
