"""Option checks that a loss term declares next to its definition.

A loss term takes keyword options (``loss(params, ctx, key, *, n_samples=1, ...)``).
:func:`options` attaches checks for some of them to the function::

    @options(n_samples=positive_int, sampling=named(SAMPLERS))
    def my_recon(params, ctx, key, *, n_samples: int = 1, sampling=continuous): ...

and :func:`spdjax.losses.term` runs exactly the checks of the function it binds: an option is
checked with its own term's meaning, never with another term's option of the same name. A
function without declared checks (your own term, say) gets only the signature check (unknown
and missing options).

A :class:`Check` is a test of one value and what it expects (for the error message), and
optionally a ``resolve`` that turns an accepted value into what the function receives (a
registered name into its value). ``together`` checks see all the options at once, with the
function's defaults filled in, and raise ``ValueError`` themselves (e.g. ``router`` and
``routing_p``).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable, Mapping, Sequence

from spdjax.core.registry import Registry
from spdjax.core.routing import make_router


@dataclasses.dataclass(frozen=True)
class Check:
    """``test(value) -> bool``; ``expected`` completes "<option> must be ..."; ``resolve`` maps
    an accepted value to the one the loss function receives (None: unchanged)."""

    test: Callable[[Any], bool]
    expected: str
    resolve: Callable[[Any], Any] | None = None


@dataclasses.dataclass(frozen=True)
class OptionChecks:
    """A loss function's declared checks: ``{option: Check}`` and the joint ``together`` ones."""

    checks: Mapping[str, Check] = dataclasses.field(default_factory=dict)
    together: tuple[Callable[[Mapping[str, Any]], None], ...] = ()


_ATTRIBUTE = "option_checks"
_NONE = OptionChecks()


def options(*together: Callable[[Mapping[str, Any]], None], **checks: Check):
    """Decorator: declares ``checks`` (``option=Check``) and joint ``together`` checks on a loss
    function, for :func:`spdjax.losses.term`; the function itself is returned unchanged.

    Every checked option must be a keyword parameter of the function (a ``TypeError`` at
    definition otherwise), so a check cannot silently go unused.
    """

    def declare(fn):
        params = inspect.signature(fn).parameters
        unknown = sorted(set(checks) - set(params))
        if unknown:
            raise TypeError(f"{getattr(fn, '__name__', fn)!r} declares checks for {unknown}, "
                            f"which are not among its parameters {list(params)}.")
        setattr(fn, _ATTRIBUTE, OptionChecks(dict(checks), tuple(together)))
        return fn

    return declare


def declared_checks(fn) -> OptionChecks:
    """The checks ``fn`` declared with :func:`options` (none for any other function)."""
    declared = getattr(fn, _ATTRIBUTE, _NONE)
    return declared if isinstance(declared, OptionChecks) else _NONE


# ------------------------------------------------------------------------------ the checks


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


positive_int = Check(lambda v: _integer(v) and v >= 1, "an integer >= 1")
nonnegative_int = Check(lambda v: _integer(v) and v >= 0, "an integer >= 0")
positive_finite = Check(lambda v: _number(v) and math.isfinite(v) and v > 0,
                        "a finite number > 0")
nonnegative = Check(lambda v: _number(v) and v >= 0, "a number >= 0")
nonnegative_finite = Check(lambda v: _number(v) and math.isfinite(v) and v >= 0,
                           "a finite number >= 0")
optional_positive = Check(lambda v: v is None or (_number(v) and v > 0), "None or a number > 0")
optional_probability = Check(lambda v: v is None or (_number(v) and 0 <= v <= 1),
                             "None or a number in [0, 1]")
boolean = Check(lambda v: isinstance(v, bool), "true or false")


def one_of(values: Sequence[Any]) -> Check:
    """A value among ``values`` (e.g. PGD's ``init``: ``("random", "ones", "zeroes")``)."""
    values = tuple(values)
    return Check(lambda v: isinstance(v, str) and v in values, f"one of {values}")


def named(registry: Registry) -> Check:
    """A name in ``registry`` (resolved to its value; an unknown name fails with the registry's
    list of choices) or a value of that kind already."""
    return Check(lambda v: True, f"a {registry.kind} name or value", registry.resolve)


def router_and_probability(opts: Mapping[str, Any]) -> None:
    """``router`` and ``routing_p`` together: ``routing_p`` only with ``"static_probability"``,
    which needs it; an unknown router name fails."""
    router, p = opts.get("router"), opts.get("routing_p")
    if router is not None or p is not None:
        make_router(router, p)
