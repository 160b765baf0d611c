"""docs/guides/extending.md runs as written: each example's code, in order, as a user would.

Per example section: the ```python blocks whose first line names a file (``# my_losses.py``) are
written to a fresh working directory, the other ```python blocks are executed there in order in
one fresh namespace, and the ```bash block (the command line) is run as a real process from that
directory. The tests then check what the guide promises: the new term is trained and reported,
the new method is recorded and read back by name, the new family's evaluation and figures ran.
Registrations made by an example are undone afterwards (they would leak into other tests).
"""

import copy
import json
import math
import os
import pathlib
import re
import shlex
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spdjax
from spdjax.config import runs
from spdjax.training.checkpoints import Checkpointer

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guides" / "extending.md"
FENCE = re.compile(r"^```(\w+)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
FILE_LINE = re.compile(r"#\s*([\w.]+\.py)\s*$")


def section(title: str) -> str:
    """The text of the ``## title`` section of the guide (up to the next ``## `` heading)."""
    parts = re.split(r"^## ", GUIDE.read_text(), flags=re.M)
    found = [p for p in parts[1:] if p.splitlines()[0].strip() == title]
    assert len(found) == 1, f"the guide has no single section {title!r}"
    return found[0]


def blocks(title: str) -> list[tuple[str, str]]:
    """``[(language, code)]`` of the section's fenced blocks, in order."""
    return [(lang, code) for lang, code in FENCE.findall(section(title))]


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A fresh working directory on ``sys.path``; the registries and the imported example
    modules are restored afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for registry in (spdjax.LOSSES, spdjax.METHODS, spdjax.FAMILIES):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        path = getattr(sys.modules[name], "__file__", None) or ""
        if path.startswith(str(tmp_path)):
            del sys.modules[name]


def run_example(title: str, workdir: pathlib.Path, *, execute: bool = True
                ) -> tuple[dict, list[list[str]]]:
    """Writes the section's files and (``execute``) executes its scripts in one namespace;
    returns the namespace and the section's shell commands (each split into arguments)."""
    namespace: dict = {"__name__": "__main__"}
    commands = []
    found = blocks(title)
    assert any(lang == "python" for lang, _ in found), title
    for i, (lang, code) in enumerate(found):
        first = code.splitlines()[0] if code.strip() else ""
        if lang == "python" and FILE_LINE.fullmatch(first.strip()):
            (workdir / FILE_LINE.fullmatch(first.strip()).group(1)).write_text(code)
        elif lang == "python" and execute:
            exec(compile(code, f"{GUIDE.name} [{title}] block {i}", "exec"), namespace)
        elif lang == "bash":
            commands += [shlex.split(line) for line in code.replace("\\\n", " ").splitlines()
                         if line.strip()]
    return namespace, commands


def run_cli(command: list[str], cwd: pathlib.Path) -> str:
    """Runs a documented ``python -m spdjax.main ...`` line as its own process, in ``cwd``."""
    assert command[:3] == ["python", "-m", "spdjax.main"], command
    env = dict(os.environ)  # SPDJAX_CACHE (conftest): the session's target cache
    env.pop("XLA_FLAGS", None)  # one CPU device, like a user's
    env.pop("PYTHONPATH", None)  # the example's module is found from the working directory
    env["PYTHONUNBUFFERED"] = "1"
    p = subprocess.run([sys.executable, *command[1:]], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout + p.stderr


def workdir_of(command: list[str], cwd: pathlib.Path) -> pathlib.Path:
    (flag,) = [a for a in command if a.startswith("--workdir=")]
    return cwd / flag.split("=", 1)[1]


def config_file(command: list[str], cwd: pathlib.Path):
    """The config the command line's ``--config=<file>[:arg]`` names, loaded in this process as
    the CLI loads it, with the command's ``--config.<field>`` values; checked (every field, the
    method's and the loss terms' own checks) without training anything."""
    (flag,) = [a for a in command if a.startswith("--config=")]
    assigned = spdjax.config.parse_assignments(
        [a[len("--config."):] for a in command if a.startswith("--config.")])
    overrides = {k: {"True": True, "False": False}.get(v, v) if isinstance(v, str) else v
                 for k, v in assigned.items()}  # absl's spelling of booleans
    path, _, arg = flag[len("--config="):].partition(":")
    config = spdjax.config.load(f"{cwd / path}:{arg}" if arg else str(cwd / path), overrides)
    runs.validate(config)
    return config


def read_json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text())


def last_metrics(workdir: pathlib.Path) -> dict:
    return json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])


def test_the_guide_has_the_three_examples():
    for title in ("Add a loss term", "Add a method", "Add a target family"):
        langs = [lang for lang, _ in blocks(title)]
        assert langs.count("bash") == 1 and langs.count("python") >= 3, (title, langs)


def test_add_a_loss_term(sandbox, capsys):
    ns, commands = run_example("Add a loss term", sandbox)
    out = capsys.readouterr().out

    summary = ns["summary"]
    assert summary["steps"] == 50
    assert math.isfinite(summary["loss"]["ci_budget"]) and "total" in summary["loss"]
    wd = sandbox / "workdir" / "tms_ci_budget"
    assert read_json(wd / "config.json")["losses"]["ci_budget"] == {"coeff": 0.1, "budget": 1.5}
    assert "loss/ci_budget" in last_metrics(wd)
    # bound by name and by value: the same function; a misspelt option was refused and printed
    assert ns["bound"].fn is ns["same"].fn is sys.modules["my_losses"].ci_budget
    assert ns["bound"].options == {"budget": 1.5} and ns["bound"].coeff == 0.1
    assert "budjet" in out  # the misspelt option, named ...
    assert re.search(r"budget must be .*, got -1\.0", out)  # ... and the declared check's message
    assert math.isfinite(ns["value"]) and ns["value"] >= 0

    # The term is differentiable through ctx: a budget below the CIs' sum has a gradient.
    run = ns["run"]
    tight = spdjax.term("ci_budget", 1.0, budget=0.01)
    batch = run.experiment.eval_batch_fn(jax.random.key(0))

    def loss(params):
        ctx = spdjax.make_context(run.decomposition, run.target_params, params, batch)
        return tight(params, ctx, jax.random.key(0))

    grads = jax.jit(jax.grad(loss))(run.params)  # one program, not ~100 eager ops
    assert float(sum(jnp.sum(jnp.abs(g)) for g in jax.tree.leaves(grads["ci"]))) > 0

    (command,) = commands  # its config file (the CLI's run: test_cli_of_the_examples)
    assert dict(config_file(command, sandbox).losses.ci_budget) == {"coeff": 0.1, "budget": 2.0}
    with pytest.raises(ValueError, match=r"budget must be .*, got 0\.0"):
        config_file(command + ["--config.losses.ci_budget.budget=0.0"], sandbox)


@pytest.mark.slow  # ~20 s; the method protocol is exercised by SPD, APD and L3D's own runs
def test_add_a_method(sandbox, capsys):
    ns, commands = run_example("Add a method", sandbox)
    out = capsys.readouterr().out

    summary = ns["summary"]
    assert summary["steps"] == 50 and math.isfinite(summary["loss"]["total"])
    assert "mmcs" in summary and "ci_errors" in summary  # the TMS family's evaluation ran
    wd = sandbox / "workdir" / "tms_adamw"
    config = read_json(wd / "config.json")
    assert config["method"] == "spd_adamw" and config["adamw"] == {"weight_decay": 1e-4}
    ckpt = Checkpointer(wd / "checkpoints")
    try:
        assert ckpt.read_meta(None)["method"] == "spd_adamw"
    finally:
        ckpt.close()
    run = ns["run"]
    assert run.method.name == "spd_adamw" and run.step == 50
    assert "spd_adamw at step 50" in out

    # AdamW, not SPD's Adam: with zero gradients only the weight decay moves the params.
    params = run.params
    opt = run.method.optimizer
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    assert float(sum(jnp.sum(jnp.abs(u)) for u in jax.tree.leaves(updates))) > 0
    spd = runs.resolve(run.config, method="spd")[1].build(run.config, run.experiment, 1e-3)
    updates, _ = spd.optimizer.update(jax.tree.map(jnp.zeros_like, params),
                                      spd.optimizer.init(params), params)
    assert float(sum(jnp.sum(jnp.abs(u)) for u in jax.tree.leaves(updates))) == 0

    # Its check_config runs before any work: a config without the method's field is refused.
    bare = spdjax.config.load("tms:5-2", {"method": "spd_adamw"})
    with pytest.raises(ValueError, match="config.adamw.weight_decay"):
        runs.validate(bare)
    with pytest.raises(ValueError, match=r"does not implement \['faithfulness_warmup_steps'\]"):
        runs.validate(spdjax.config.apply_overrides(copy.deepcopy(ns["config"]),
                                                    {"faithfulness_warmup_steps": 200}))

    (command,) = commands  # its config file (the CLI's run: test_cli_of_the_examples)
    config = config_file(command, sandbox)
    assert config.method == "spd_adamw" and config.adamw.weight_decay == 1e-3
    with pytest.raises(ValueError, match="weight_decay, a number >= 0; got -1"):
        config_file(command + ["--config.adamw.weight_decay=-1"], sandbox)


@pytest.mark.slow  # ~45 s; the guide's family protocol is exercised by every family's own tests
def test_add_a_target_family(sandbox, capsys):
    ns, commands = run_example("Add a target family", sandbox)
    out = capsys.readouterr().out

    assert "['Dense_0', 'Dense_1']" in out
    summary = ns["summary"]
    assert summary["steps"] == 50
    assert set(summary["weight_error"]) == {"Dense_0", "Dense_1"}  # the family's evaluate ran
    assert set(summary["active_per_feature"]) == {"Dense_0", "Dense_1"}
    assert set(summary["ci_l0"]) == {"Dense_0", "Dense_1"}  # and SPD's own
    # load() rebuilt the run by its recorded names and recomputed the same metrics
    for key in ("weight_error", "active_per_feature"):
        for site, value in summary[key].items():
            np.testing.assert_allclose(ns["again"][key][site], value, rtol=1e-6)
    wd = sandbox / "workdir" / "autoencoder"
    assert {"ci_one_hot.png", "training_curves.png"} <= {p.name for p in
                                                         (wd / "figures").glob("*.png")}
    assert (wd / "target_params.npz").exists()
    cache = pathlib.Path(os.environ["SPDJAX_CACHE"]) / "targets"
    assert (cache / "autoencoder_5-2_seed0.npz").exists()  # trained once, cached

    # The step-by-step run stopped at its checkpoint and resumed from it ...
    assert "resumed at step 25" in out
    again = ns["summary2"]  # ... and ended where the uninterrupted run did, as promised
    assert again["steps"] == 50
    for key in ("weight_error", "active_per_feature", "loss", "ci_l0"):
        for site, value in summary[key].items():
            np.testing.assert_allclose(again[key][site], value, rtol=1e-6, err_msg=key)

    (command,) = commands  # its config file (the CLI's run: test_cli_of_the_examples)
    config = config_file(command, sandbox)
    assert (config.experiment, config.variant, config.C) == ("autoencoder", "8-3", 12)


@pytest.mark.slow  # ~60 s: three CLI processes (the examples themselves run in the default suite)
@pytest.mark.parametrize("title", ["Add a loss term", "Add a method", "Add a target family"])
def test_cli_of_the_examples(sandbox, title):
    _, (command,) = run_example(title, sandbox, execute=False)
    run_cli(command, sandbox)
    wd = workdir_of(command, sandbox)
    config, summary = read_json(wd / "config.json"), read_json(wd / "summary.json")
    assert summary["steps"] == 50
    if title == "Add a loss term":
        assert config["losses"]["ci_budget"]["budget"] == 2.0
        assert math.isfinite(summary["loss"]["ci_budget"])
        assert "loss/ci_budget" in last_metrics(wd)
    elif title == "Add a method":
        assert config["method"] == "spd_adamw" and config["adamw"]["weight_decay"] == 1e-3
        assert "mmcs" in summary
    else:
        assert (config["experiment"], config["variant"], config["C"]) == ("autoencoder", "8-3",
                                                                         12)
        assert set(summary["weight_error"]) == {"Dense_0", "Dense_1"}
