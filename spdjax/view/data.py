"""What the viewer shows, as JSON-able dicts: pure functions from a run's workdir to each view.

Everything is read from files the run and the analysis commands wrote; nothing trains, loads a
checkpoint or runs the model, so a page of a large run opens at once. What is missing is named
together with the command that makes it (``"hint"`` entries).

* :func:`run_view`: the run page: its config, its summary as an evaluation table, its training
  curves (``metrics.jsonl``), its figures (``figures/*.png``: the family's own and the common
  ones), its sites and which analyses exist;
* :func:`site_view`: one site: its subcomponents sorted by use (harvest density), with mean CI,
  top input / output tokens (precision, recall, PMI), partners, cluster and sampled examples
  (for a language model the tokens around each firing with the subcomponent's CI at each), and
  histograms of density and mean CI over the site's subcomponents.

Floats that are not finite become ``None`` (:func:`jsonable`): a browser's ``JSON.parse``
refuses ``NaN``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Callable, Sequence

import numpy as np

from spdjax import families  # noqa: F401 (registers the built-in families: their titles)
from spdjax.analysis import harvest_result, streaming
from spdjax.families.lm import harvest_page
from spdjax.training.family import FAMILIES

MAX_CURVE_POINTS = 400  # per training curve; longer logs are subsampled evenly (last kept)
HIST_BINS = 20
FIGURES_DIR = "figures"
# Figures of the family itself (the rest are common to every decomposition).
COMMON_FIGURES = ("training_curves.png", "ci_lower_leaky.png", "ci_upper_leaky.png",
                  "max_cosine.png")


# The methods' display names; an SPD run trained with VPD's terms is labelled by that recipe.
METHOD_TITLES = {"spd": "SPD", "apd": "APD", "l3d": "L3D"}
# Loss terms only VPD's recipe uses (spdjax/config/vpd.py, the ``+vpd`` config modifier).
VPD_TERMS = ("stochastic_pgd_recon_subset", "smooth_l0_importance_minimality",
             "nested_frequency_minimality", "nested_frequency_minimality_ema")
# Methods without causal importances: no harvest, CI histograms or clustering to show.
NO_CI = {"l3d": "L3D learns subnetwork directions, not causal importances, so this run has no "
                "harvest, CI histograms or clustering (docs/guides/l3d.md)."}


def method_label(config: dict) -> str:
    """The run's method as the page names it: ``"SPD"``, ``"SPD (VPD recipe)"`` (SPD with any
    of :data:`VPD_TERMS` among its losses), ``"APD"``, ``"L3D"``, or an unknown method's name
    in capitals."""
    method = str(config.get("method", "spd"))
    label = METHOD_TITLES.get(method, method.upper())
    losses = config.get("losses") or {}
    if method == "spd" and any(t in losses for t in VPD_TERMS):
        label += " (VPD recipe)"
    return label


class NotARunError(ValueError):
    """The directory holds no run (no ``config.json`` and no ``checkpoints/``)."""


def check_workdir(workdir: str | pathlib.Path) -> pathlib.Path:
    """``workdir`` as a path, or a clear error: missing, not a directory, or not a run."""
    path = pathlib.Path(workdir).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--workdir={workdir}: no such directory.")
    if not path.is_dir():
        raise NotARunError(f"--workdir={workdir} is a file, not a run's directory.")
    if not (path / "config.json").is_file() and not (path / "checkpoints").is_dir():
        raise NotARunError(f"--workdir={workdir} holds no run: expected config.json or "
                           "checkpoints/ there (a directory `python -m spdjax.main "
                           "--workdir=...` wrote).")
    return path


def jsonable(x: Any) -> Any:
    """``x`` with NumPy values as Python ones and non-finite floats as ``None``."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def _read_json(path: pathlib.Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a killed run: the rest still reads
                continue
    return out


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
    """The steps of the checkpoints in ``workdir/checkpoints`` (finished or not), ascending."""
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def flatten(d: dict, prefix: str = "") -> list[list]:
    """``[[key, value], ...]`` of a nested dict, keys joined by ``/`` (the evaluation table)."""
    rows = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            rows += flatten(v, key + "/")
        else:
            rows.append([key, v])
    return rows


def curves(metrics: Sequence[dict], max_points: int = MAX_CURVE_POINTS) -> dict[str, list]:
    """``{metric: [[step, value], ...]}`` for every numeric metric of ``metrics.jsonl``'s lines,
    at most ``max_points`` points each (evenly subsampled, the last line kept)."""
    series: dict[str, list] = {}
    for line in metrics:
        step = line.get("step")
        if not isinstance(step, (int, float)):
            continue
        for k, v in line.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                series.setdefault(k, []).append([step, v])
    for k, pts in series.items():
        if len(pts) > max_points:
            idx = np.unique(np.linspace(0, len(pts) - 1, max_points).round().astype(int))
            series[k] = [pts[i] for i in idx]
    return dict(sorted(series.items()))


def hints(workdir: pathlib.Path) -> dict[str, str]:
    """The commands that make what a view shows, for this workdir."""
    w = str(workdir)
    return {"harvest": f"python -m spdjax.harvest --workdir={w}",
            "clustering": f"python -m spdjax.cluster --workdir={w}",
            "figures": f"python -m spdjax.cli.plot --workdir={w}",
            "summary": f"python -m spdjax.main --config=... --workdir={w} (the summary is "
                       "written when training ends)",
            "graph": f"python -m spdjax.view --workdir={w} (the live server)"}


def _sites(summary: dict | None, metrics: Sequence[dict], harvest_spec) -> list[dict]:
    """The sites with their C: from the harvest when there is one, else the names the run's
    CI-L0 metrics carry (C unknown until a harvest)."""
    if harvest_spec is not None:
        return [{"name": s, "C": int(c)} for s, c in zip(harvest_spec.sites, harvest_spec.sizes)]
    if summary and isinstance(summary.get("ci_l0"), dict):
        names = list(summary["ci_l0"])
    else:
        names = [k[len("ci_l0/"):] for k in (metrics[-1] if metrics else {})
                 if k.startswith("ci_l0/")]
    return [{"name": n, "C": None} for n in names]


def _harvest_spec(workdir: pathlib.Path):
    path = workdir / "analysis" / "harvest" / "harvest.npz"
    if not path.is_file():
        return None
    meta = streaming.read_meta(path)
    return harvest_result.HarvestSpec(**meta["spec"])


def run_view(workdir: str | pathlib.Path) -> dict:
    """The run page of ``workdir`` (JSON-able); see the module docstring."""
    workdir = check_workdir(workdir)
    config = _read_json(workdir / "config.json") or {}
    summary = _read_json(workdir / "summary.json")
    metrics = _read_jsonl(workdir / "metrics.jsonl")
    spec = _harvest_spec(workdir)
    family = config.get("experiment", "?")
    figures = sorted(p.name for p in (workdir / FIGURES_DIR).glob("*.png"))
    title = FAMILIES[family].title if family in FAMILIES else family
    h = hints(workdir)
    missing = {}
    if summary is None:
        missing["summary"] = "no summary.json yet: " + h["summary"]
    if not figures:
        missing["figures"] = "no figures yet: " + h["figures"]
    method = config.get("method", "spd")
    clustering = _read_json(workdir / "analysis" / "clustering" / "clustering.json")
    if method in NO_CI:
        missing["ci"] = NO_CI[method]
    else:
        if spec is None:
            missing["harvest"] = "no harvest yet: " + h["harvest"]
        if clustering is None:
            missing["clustering"] = "no clustering yet: " + h["clustering"]
    return jsonable({
        "workdir": str(workdir), "name": workdir.name, "family": family, "family_title": title,
        "variant": config.get("variant"), "method": method,
        "method_label": method_label(config),
        "steps": config.get("steps"), "checkpoints": checkpoint_steps(workdir),
        "is_lm": family == "lm",
        "config": config, "summary": summary,
        "evaluation": flatten(summary) if summary else [],
        "curves": curves(metrics),
        "figures": [{"file": f, "family": f not in COMMON_FIGURES} for f in figures],
        "sites": _sites(summary, metrics, spec),
        "harvest": None if spec is None else {"threshold": spec.threshold, "kind": spec.kind},
        "clustering": None if clustering is None else _clustering_overview(clustering),
        "missing": missing,
    })


def _clustering_overview(c: dict) -> dict:
    seeds = c.get("seeds", {})
    first = next(iter(seeds.values()), {})
    return {"seeds": list(seeds), "clusters": first.get("clusters"),
            "multi_member_clusters": first.get("multi_member_clusters"),
            "largest_cluster": first.get("largest_cluster"),
            "distance_hamming_mean": c.get("distance_hamming_mean")}


def token_decoder(config: dict) -> tuple[Callable[[int], str], str | None]:
    """``(one token id as text, why not)`` for the run config ``config``: a byte LM's byte, a
    text (Llama) LM's BPE token (:func:`model_token_text`), otherwise the id itself. ``why not``
    says why a text LM's tokens are ids after all (its corpus and tokenizer cannot be read)."""
    family = config.get("experiment")
    as_id = lambda t: str(int(t))  # noqa: E731
    if family != "lm" or family not in FAMILIES:
        return as_id, None
    try:
        cfg = FAMILIES[family].variant(config.get("variant", "ih"))
        recipe = config.get("target_recipe") or {}
        cfg = dataclasses.replace(cfg, **{k: v for k, v in recipe.items() if hasattr(cfg, k)})
    except (ValueError, TypeError):
        return as_id, None
    if getattr(cfg, "data", None) == "bytes":
        return (lambda t: bytes([int(t)]).decode("latin-1")), None
    try:
        text = model_token_text(cfg)
    except (OSError, ValueError) as e:
        return as_id, (f"tokens shown as ids: the run's tokenizer could not be read ({e}); "
                       "it is trained with the target, on the same text files")
    return text or as_id, None


def model_token_text(model_config: Any) -> Callable[[int], str] | None:
    """One token id as its text for a text (Llama) LM's model config, with the tokenizer of its
    corpus (:func:`spdjax.families.lm.harvest_page.decoder`; read from the corpus cache, built
    there first if absent); None for other configs."""
    if getattr(model_config, "data", None) != "text":
        return None
    decode = harvest_page.decoder(model_config)
    return lambda t: decode([int(t)])


def _hist(values: np.ndarray, edges: np.ndarray) -> dict:
    counts, edges = np.histogram(values, bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def _clusters_by_name(workdir: pathlib.Path) -> tuple[dict[str, int], list[list[str]], Any]:
    """``(name -> cluster index, clusters, seed)`` of the clustering's first seed (clusters of two
    or more; a subcomponent not in one is its own)."""
    c = _read_json(workdir / "analysis" / "clustering" / "clustering.json")
    if not c or not c.get("seeds"):
        return {}, [], None
    seed, first = next(iter(c["seeds"].items()))
    members = first.get("members", [])
    return {n: i for i, m in enumerate(members) for n in m}, members, seed


def site_view(workdir: str | pathlib.Path, site: str, *, examples: int | None = None,
              top: int = 5) -> dict:
    """The page of one ``site`` of ``workdir`` (JSON-able); see the module docstring.

    ``examples``: at most this many sampled examples per subcomponent (default: all the harvest
    kept); ``top``: tokens and partners listed per subcomponent."""
    workdir = check_workdir(workdir)
    try:
        h = harvest_result.load_harvest(workdir)
    except FileNotFoundError:
        return {"site": site, "harvest": None,
                "missing": {"harvest": "no harvest yet: " + hints(workdir)["harvest"]}}
    if site not in h.spec.sites:
        raise ValueError(f"No site {site!r} in the harvest of {workdir}; sites: "
                         f"{list(h.spec.sites)}.")
    config = _read_json(workdir / "config.json") or {}
    tokens = h.spec.kind == "tokens"
    decode, no_tokenizer = token_decoder(config) if tokens else (lambda t: f"x{int(t)}", None)
    out_label = decode if tokens else (lambda t: f"y{int(t)}")
    cluster_of, clusters, seed = _clusters_by_name(workdir)
    off = h.spec.offsets()[site]
    C = h.spec.sizes[h.spec.sites.index(site)]
    idx = np.arange(off, off + C)
    density, mean_ci, count = h.density[idx], h.mean_ci[idx], h.count[idx]
    stats = {w: h.token_stats(w) for w in ("input", "output")}
    fire_counts = {"input": h.state["in_fire"], "output": h.state["out_fire"]}
    cooc = h.cooccurrence
    names = h.names
    order = sorted(range(C), key=lambda c: (-count[c], -mean_ci[c], c))
    comps = []
    for c in order:
        i = off + c
        row = {"name": names[i], "c": c, "count": int(count[c]), "density": density[c],
               "mean_ci": mean_ci[c], "cluster": cluster_of.get(names[i])}
        if count[c] > 0:
            for which, label in (("input", decode), ("output", out_label)):
                joint = fire_counts[which][i]
                v = np.where(joint > 0, stats[which]["pmi"][i], -np.inf)
                row[f"{which}_tokens"] = [
                    {"token": int(t), "text": label(t), "pmi": stats[which]["pmi"][i, t],
                     "precision": stats[which]["precision"][i, t],
                     "recall": stats[which]["recall"][i, t]}
                    for t in np.argsort(-v, kind="stable")[:top] if joint[t] > 0]
            p = cooc[i].astype(np.float64) / count[c]
            p[i] = -1
            row["partners"] = [{"name": names[j], "p": p[j]}
                               for j in np.argsort(-p, kind="stable")[:top] if cooc[i, j] > 0]
            row["examples"] = _examples(h, names[i], decode, examples)
        comps.append(row)
    return jsonable({
        "site": site, "C": C, "n": h.n, "kind": h.spec.kind, "threshold": h.spec.threshold,
        "window": h.spec.window, "firing": int(np.sum(count > 0)),
        "harvest": {k: h.meta.get(k) for k in ("n_batches", "batch_size", "seed", "step")},
        "subcomponents": comps,
        "histograms": _histograms(h, names[off:off + C], density[count > 0], mean_ci),
        "clusters": {"seed": seed, "members": {
            str(k): m for k, m in enumerate(clusters)
            if any(n.rsplit(":", 1)[0] == site for n in m)}},
        "missing": {**({} if seed is not None else {
            "clustering": "no clustering yet: " + hints(workdir)["clustering"]}),
            **({"tokenizer": no_tokenizer} if no_tokenizer else {})},
    })


def _histograms(h, names: Sequence[str], firing_density: np.ndarray,
                mean_ci: np.ndarray) -> dict:
    """Over a site's subcomponents: ``log10_density`` (those that fired), ``mean_ci`` (all;
    bins up to the largest) and ``firing_ci``, the CI at every sampled firing pooled (each
    subcomponent's sample is uniform over its firings, so subcomponents weigh alike)."""
    lo = math.floor(math.log10(firing_density.min())) if firing_density.size else -6
    top = float(mean_ci.max()) if mean_ci.size and mean_ci.max() > 0 else 1.0
    fired_ci = np.array([e["ci"] for n in names for e in h.examples(n)])
    return {"log10_density": _hist(np.log10(firing_density), np.linspace(lo, 0.0, HIST_BINS + 1)),
            "mean_ci": _hist(mean_ci, np.linspace(0.0, top, HIST_BINS + 1)),
            "firing_ci": _hist(fired_ci, np.linspace(h.spec.threshold, 1.0, HIST_BINS + 1))}


def _examples(h, name: str, decode, limit: int | None) -> list[dict]:
    """The sampled firings of ``name``, largest CI first: a window of tokens with their CI (the
    firing token at ``center``), or a toy's active input features ``[[i, x_i], ...]``."""
    out = []
    for e in sorted(h.examples(name), key=lambda e: -e["ci"])[:limit]:
        if "tokens" in e:
            keep = [j for j, t in enumerate(e["tokens"]) if t >= 0]
            out.append({"ci": e["ci"],
                        "tokens": [decode(e["tokens"][j]) for j in keep],
                        "token_ci": [e["window_ci"][j] for j in keep],
                        "center": keep.index(h.spec.window) if h.spec.window in keep else None})
        else:
            x = np.asarray(e["inputs"])
            out.append({"ci": e["ci"],
                        "inputs": [[int(j), float(x[j])] for j in np.flatnonzero(x)]})
    return out
