"""Train (or load from the cache) a family's target with its recipe, and report it::

    python -m spdjax.cli.target --family=tms --variant=5-2 --seed=0
    python -m spdjax.cli.target --family=resid_mlp --variant=1
    python -m spdjax.cli.target --family=lm --variant=ih

Any family in :data:`spdjax.training.family.FAMILIES` with a target cache works; a family of
your own through ``--import=my_module`` (the module registers it). A bad variant or cache folder
is one ``error:`` line (exit 2); Ctrl-C exits 130 with one line.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from spdjax import families  # noqa: F401 (registers the built-in families)
from spdjax.training.family import FAMILIES
from spdjax.training.progress import log_to
from spdjax.training.targets import check_cache_dir, default_cache_dir, read_meta


def main(argv: list[str] | None = None) -> None:
    """Parses ``argv`` (default: the command line), trains or loads the target, prints a report."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(
        description="Train (or load from the cache) a target family's target with its recipe.")
    parser.add_argument("--family", required=True,
                        help=f"a registered family: built in {sorted(FAMILIES)}, or one that an "
                             "--import'ed module registers")
    parser.add_argument("--import", dest="modules", action="append", default=[],
                        metavar="MODULE", help="import MODULE first (it registers a family)")
    parser.add_argument("--variant", default=None, help="default: the family's default variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=str(default_cache_dir()))
    args = parser.parse_args(argv)
    for module in args.modules:
        importlib.import_module(module)
    try:
        family = FAMILIES.get(args.family)
    except ValueError as e:
        parser.error(str(e))
    if family.cache_stem is None or family.report is None:
        parser.error(f"family {args.family!r} has no target cache to train into.")
    try:
        cfg = family.variant(args.variant or family.default_variant)
        check_cache_dir(args.cache_dir)  # before any training
        # The "spdjax" logger's progress lines while a target trains: basicConfig above does
        # nothing when an import (absl, through JAX) has given the root logger a handler.
        with log_to(sys.stderr):
            params = family.load_target_params(cfg, args.seed, args.cache_dir)
        stem = family.cache_stem(cfg, args.seed, args.cache_dir)
        print(family.report(params, cfg, read_meta(stem), stem))
    except KeyboardInterrupt:
        _fail(130, "interrupted; nothing was cached for this target (rerun to train it).")
    except (ValueError, OSError, FloatingPointError) as e:
        _fail(2, str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}")


def _fail(code: int, message: str):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
