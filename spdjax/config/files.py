"""The one loader of config files: by name or path, with overrides, or from a run's record.

A config file (``configs/<name>.py``) defines ``get_config(arg)`` on top of :func:`base_config`;
the CLI reads it with ``--config=configs/tms.py:5-2`` and everything else with
:func:`load` (``load("tms:5-2+gaussian")``), so benchmarks, notebooks and tests see exactly the
config the CLI would. The base lives in the package rather than next to the config files because
ml_collections loads a config file by path, without its directory on ``sys.path``.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import pathlib
from typing import Any, Mapping

import ml_collections

from spdjax.config.base import base_config, later_reference  # noqa: F401 (re-exported)
from spdjax.training.workdir import config_dict as to_dict

# The config files by name: the top-level configs/ directory, installed as this package (a wheel
# and an editable install alike; pyproject.toml maps it).
PRESETS = "spdjax.presets"


def config_dir() -> pathlib.Path:
    """The directory of the config files found by name (``configs/`` of a checkout, installed as
    ``spdjax.presets``); the checkout's ``configs/`` when spdjax runs from a source tree that is
    not installed (``PYTHONPATH=.``)."""
    try:
        return pathlib.Path(str(importlib.resources.files(PRESETS)))
    except ModuleNotFoundError:
        return pathlib.Path(__file__).resolve().parents[2] / "configs"


def known_configs() -> list[str]:
    """The names :func:`load` accepts, e.g. ``["lm", "resid_mlp", "tms"]``."""
    return sorted(p.stem for p in config_dir().glob("*.py") if not p.stem.startswith("_"))


def _config_file(name: str) -> pathlib.Path:
    """A config file: ``name`` itself if it ends in ``.py`` (a path), else the named one."""
    path = pathlib.Path(name)
    if path.suffix == ".py":
        return path
    known = known_configs()
    if name not in known:
        raise UnknownConfigError(f"Unknown config {name!r}; expected one of {known} or a path "
                                 f"to a .py file.")
    return config_dir() / f"{name}.py"


config_path = _config_file  # public: the CLI turns --config=<name> into a path with it


class UnknownConfigError(ValueError):
    """No config file of that name."""


def load(spec: str, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The config ``spec`` = ``"<name or path.py>[:<arg>]"``, with dotted-key ``overrides``.

    ``load("tms")``, ``load("tms:5-2-id+gaussian")``, ``load("configs/resid_mlp.py:2",
    {"steps": 100, "losses.importance_minimality.coeff": 1e-4})``. The result is locked, as
    on the command line: a misspelt field is an error.
    """
    name, _, arg = spec.partition(":")
    path = _config_file(name)
    module_spec = importlib.util.spec_from_file_location(f"spdjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    config.lock()
    return apply_overrides(config, overrides or {})


def from_dict(recorded: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A locked config from a recorded one (``config.json``, a checkpoint's metadata).

    Fields the record lacks (added to spdjax after it was written) get the defaults of its
    experiment's config file, so runs written by an older version load with today's code.
    """
    for key in ("experiment", "variant"):
        if key not in recorded:
            raise ValueError(f"A recorded config needs {key!r}; got fields {sorted(recorded)}.")
    try:
        config = load(f"{recorded['experiment']}:{recorded['variant']}")
    except UnknownConfigError:  # a family of the user's, without a config file
        config = base_config(recorded["experiment"], recorded["variant"])
        config.lock()
    with config.unlocked():
        _merge(config, _upgrade(recorded))
    return config


def _upgrade(recorded: Mapping[str, Any]) -> dict:
    """A record written before a default changed gets the value its run actually used."""
    recorded = dict(recorded)
    if "target_recipe" not in recorded and recorded["experiment"] == "tms":
        # Before 0.3 the TMS target took one AdamW update of the tied W per step.
        recorded["target_recipe"] = {"double_update": False}
    apd = recorded.get("apd")
    if isinstance(apd, Mapping) and "init_fans" not in apd:
        # Before init_fans every APD run used each component's own fans.
        recorded["apd"] = {**apd, "init_fans": "component"}
    return recorded


# Name -> options maps: a record's entries are the whole of it (a term absent from the record was
# not in the run), unlike fixed fields, where a missing one is newer than the record.
_WHOLE = ("losses", "eval_losses")


def _merge(config: ml_collections.ConfigDict, recorded: Mapping[str, Any]) -> None:
    for key, value in recorded.items():
        if key in _WHOLE:
            config[key] = ml_collections.ConfigDict(value)
        elif isinstance(value, Mapping) and isinstance(config.get(key), ml_collections.ConfigDict):
            _merge(config[key], value)
        else:
            config[key] = tuple(value) if isinstance(config.get(key), tuple) else value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]):
    """Sets ``{"a.b": value}`` fields of a locked config; an unknown field or a value of the wrong
    type is a ``ValueError`` naming it. ``target_recipe.<field>`` may name any field of the
    family's target recipe (e.g. TMS ``batch_size``): the family checks it when the target is
    built. ``losses.<term>`` (and ``eval_losses.<term>``) may add a term the config lacks, its
    options given whole: ``{"losses.unmasked_recon": {"coeff": 1.0}}``, and
    ``losses.<term>.<option>`` may add an option the term's entry lacks (the loss checks its name
    and value when the run's config is checked)."""
    for key, value in overrides.items():
        head, _, field = key.partition(".")
        if head == "target_recipe" and field and field not in config.target_recipe:
            # an open set: the family's recipe dataclass checks the names (model_config)
            with config.target_recipe.unlocked():
                config.target_recipe[field] = value
            continue
        if head in _WHOLE and field and "." not in field and field not in config[head]:
            # a term the config lacks: its options whole (the loss registry checks the name)
            if not isinstance(value, Mapping):
                raise ValueError(f"{key}={value!r}: {field!r} is not a term of this config's "
                                 f"{head} ({sorted(config[head].keys())}); to add it, give its "
                                 f'options as a JSON object, e.g. {key}={{"coeff": 1.0}}.')
            with config[head].unlocked():
                config[head][field] = ml_collections.ConfigDict(dict(value))
            continue
        term, _, option = field.partition(".")
        if (head in _WHOLE and option and "." not in option and term in config[head]
                and option not in config[head][term]):
            # an option the term's entry lacks: the loss's own checks name and test it
            with config[head][term].unlocked():
                config[head][term][option] = value
            continue
        try:
            config.update_from_flattened_dict({key: value})
        except (KeyError, AttributeError):
            raise ValueError(f"Unknown config field {key!r}; top-level fields: "
                             f"{sorted(config.keys())}.") from None
        except TypeError as e:
            raise ValueError(f"Config field {key!r}: {e}") from None
    return config


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``["lr=2e-3", "init=gaussian"]`` -> ``{"lr": 0.002, "init": "gaussian"}`` (JSON values
    where they parse, else strings); for scripts' ``--set key=value`` flags."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r}: expected key=value.")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def upgrade_record(recorded: Mapping[str, Any]) -> dict:
    """A recorded config as today's code reads it (:func:`from_dict`), as a plain dict."""
    return to_dict(from_dict(recorded))
