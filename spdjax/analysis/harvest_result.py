"""The result of a harvest (:mod:`spdjax.analysis.harvest`): its static shape
(:class:`HarvestSpec`), the accumulators (:func:`init_state`), the finished
:class:`Harvest` with its statistics, and :func:`load_harvest`. What the statistics mean: the
harvest module's docstring.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax.numpy as jnp
import numpy as np

from spdjax.analysis import streaming

DEFAULT_THRESHOLD = 0.1  # the config's l0_threshold default; the run's own is used when known
SUMMARY_FILE = "summary.json"
NO_PRIORITY = -1.0  # an empty reservoir slot (real priorities are in [0, 1))


@dataclasses.dataclass(frozen=True)
class HarvestSpec:
    """The static shape of a harvest: the sites and their C, the kind of input (``"tokens"``:
    integer ids ``[B, T]``; ``"features"``: float vectors ``[B, n_in]``), the input and output
    vocabularies, and the options."""

    sites: tuple[str, ...]
    sizes: tuple[int, ...]
    kind: str
    n_in: int
    n_out: int
    threshold: float = DEFAULT_THRESHOLD
    examples: int = 10
    window: int = 8
    block: int = 1024

    def __post_init__(self):
        if self.kind not in ("tokens", "features"):
            raise ValueError(f"kind must be 'tokens' or 'features'; got {self.kind!r}.")
        for name, v in (("examples", self.examples), ("block", self.block)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int; got {v!r}.")
        if not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"window must be an int >= 0; got {self.window!r}.")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1): CI is at most 1; got "
                             f"{self.threshold!r}.")

    @property
    def C(self) -> int:
        return int(sum(self.sizes))

    def offsets(self) -> dict[str, int]:
        out, o = {}, 0
        for s, c in zip(self.sites, self.sizes):
            out[s], o = o, o + c
        return out


def init_state(spec: HarvestSpec) -> dict:
    """The empty accumulators (``int32`` counts, ``float32`` sums)."""
    C, K = spec.C, spec.examples
    i32, f32 = jnp.int32, jnp.float32
    state = {
        "n": jnp.zeros((), i32), "count": jnp.zeros((C,), i32), "ci_sum": jnp.zeros((C,), f32),
        "cooc": jnp.zeros((C, C), i32),
        "in_count": jnp.zeros((spec.n_in,), i32), "in_fire": jnp.zeros((C, spec.n_in), i32),
        "out_count": jnp.zeros((spec.n_out,), i32), "out_fire": jnp.zeros((C, spec.n_out), i32),
        "ex_priority": jnp.full((C, K), NO_PRIORITY, f32), "ex_ci": jnp.zeros((C, K), f32),
        "ex_batch": jnp.full((C, K), -1, i32), "ex_pos": jnp.full((C, K), -1, i32),
    }
    if spec.kind == "tokens":
        w = 2 * spec.window + 1
        state["ex_tokens"] = jnp.full((C, K, w), -1, i32)
        state["ex_window_ci"] = jnp.full((C, K, w), jnp.nan, f32)
    else:
        state["ex_inputs"] = jnp.zeros((C, K, spec.n_in), f32)
    return state


def _div(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), 0.0)


@dataclasses.dataclass(eq=False)
class Harvest:
    """A finished harvest: the accumulators (NumPy) and the settings. Subcomponents are indexed
    globally (``index("site:c")``); statistics are ``[C_total]`` or ``[C_total, tokens]``."""

    spec: HarvestSpec
    state: dict
    meta: dict

    @classmethod
    def from_state(cls, spec: HarvestSpec, state: dict, meta: dict) -> "Harvest":
        return cls(spec, {k: np.asarray(v) for k, v in state.items()}, dict(meta))

    # names
    @property
    def names(self) -> list[str]:
        return [f"{s}:{c}" for s, n in zip(self.spec.sites, self.spec.sizes) for c in range(n)]

    def index(self, name: str | tuple[str, int]) -> int:
        """The global index of ``"site:c"`` or ``(site, c)``."""
        site, c = (name.rsplit(":", 1) if isinstance(name, str) else name)
        off = self.spec.offsets()
        c = int(c)
        if site not in off or not 0 <= c < self.spec.sizes[self.spec.sites.index(site)]:
            raise ValueError(f"No subcomponent {name!r}: sites {list(self.spec.sites)} with C "
                             f"{list(self.spec.sizes)}.")
        return off[site] + c

    # statistics
    @property
    def n(self) -> int:
        return int(self.state["n"])

    @property
    def count(self) -> np.ndarray:
        return self.state["count"].astype(np.int64)

    @property
    def density(self) -> np.ndarray:
        return self.count / max(self.n, 1)

    @property
    def mean_ci(self) -> np.ndarray:
        return self.state["ci_sum"].astype(np.float64) / max(self.n, 1)

    @property
    def cooccurrence(self) -> np.ndarray:
        return self.state["cooc"].astype(np.int64)

    def token_stats(self, which: str = "input") -> dict[str, np.ndarray]:
        """``{"precision", "recall", "pmi"}``, each ``[C_total, tokens]``, for the ``"input"``
        or ``"output"`` tokens (module docstring). Computed once per harvest (a page or summary
        asks for them per subcomponent: thousands of times ``[C_total, vocab]``)."""
        if which not in ("input", "output"):
            raise ValueError(f"which must be 'input' or 'output'; got {which!r}.")
        memo = self.__dict__.setdefault("_stats_memo", {})
        if which not in memo:
            memo[which] = self._token_stats(which)
        return memo[which]

    def _token_stats(self, which: str) -> dict[str, np.ndarray]:
        p = "in" if which == "input" else "out"
        joint = self.state[f"{p}_fire"].astype(np.float64)
        tok = self.state[f"{p}_count"].astype(np.float64)
        fire = self.count.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            pmi = np.log(joint * self.n / (fire[:, None] * tok[None, :]))
        pmi = np.where((fire[:, None] > 0) & (tok[None, :] > 0), pmi, np.nan)
        return {"precision": _div(joint, fire[:, None]), "recall": _div(joint, tok[None, :]),
                "pmi": pmi}

    def top_tokens(self, name, k: int = 5, *, which: str = "input", by: str = "pmi"
                   ) -> list[tuple[int, float]]:
        """The ``k`` tokens with the largest ``by`` (``precision``, ``recall`` or ``pmi``) for
        one subcomponent, as ``(token, value)``; tokens it never fired with are left out."""
        i = self.index(name)
        stats = self.token_stats(which)
        if by not in stats:
            raise ValueError(f"by must be one of {sorted(stats)}; got {by!r}.")
        joint = self.state["in_fire" if which == "input" else "out_fire"][i]
        v = np.where(joint > 0, stats[by][i], -np.inf)
        order = [int(t) for t in np.argsort(-v, kind="stable")[:k] if joint[t] > 0]
        return [(t, float(stats[by][i, t])) for t in order]

    def best_by_recall(self, site: str, which: str = "input"
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per token (a toy's feature): ``(c, recall, precision)``, the subcomponent of ``site``
        (its index within the site) that fires most often when the token is there, and that
        pair's recall and precision. For a ResidMLP, feature ``i``'s ``mlp_in`` subcomponent
        has recall and precision near 1 when the decomposition found the features."""
        if site not in self.spec.sites:
            raise ValueError(f"No site {site!r}; sites: {list(self.spec.sites)}.")
        off = self.spec.offsets()[site]
        C = self.spec.sizes[self.spec.sites.index(site)]
        stats = self.token_stats(which)
        recall, precision = stats["recall"][off:off + C], stats["precision"][off:off + C]
        best = np.argmax(recall, axis=0)
        cols = np.arange(recall.shape[1])
        return best, recall[best, cols], precision[best, cols]

    def examples(self, name) -> list[dict]:
        """The reservoir of one subcomponent: dicts with ``batch``, ``pos``, ``ci`` and
        ``tokens`` / ``window_ci`` (sequence models) or ``inputs`` (toys), in no order."""
        i = self.index(name)
        out = []
        for j in np.flatnonzero(self.state["ex_priority"][i] >= 0):
            e = {"batch": int(self.state["ex_batch"][i, j]), "pos": int(self.state["ex_pos"][i, j]),
                 "ci": float(self.state["ex_ci"][i, j])}
            if self.spec.kind == "tokens":
                e["tokens"] = self.state["ex_tokens"][i, j].tolist()
                e["window_ci"] = self.state["ex_window_ci"][i, j].tolist()
            else:
                e["inputs"] = self.state["ex_inputs"][i, j].tolist()
            out.append(e)
        return out

    def summary(self, top: int = 5) -> dict:
        """JSON-able: the settings, totals, and per subcomponent that ever fired its density,
        mean CI, top input / output tokens by PMI and its most co-occurring partners."""
        stats_in, stats_out = self.token_stats("input"), self.token_stats("output")
        names, cooc = self.names, self.cooccurrence
        comps = {}
        for i in np.flatnonzero(self.count > 0):
            partners = cooc[i].astype(np.float64) / max(self.count[i], 1)
            partners[i] = -1
            best = [int(j) for j in np.argsort(-partners, kind="stable")[:top] if cooc[i, j] > 0]

            def tops(stats, fire):
                v = np.where(fire > 0, stats["pmi"][i], -np.inf)
                return [{"token": int(t), "pmi": float(stats["pmi"][i, t]),
                         "precision": float(stats["precision"][i, t]),
                         "recall": float(stats["recall"][i, t])}
                        for t in np.argsort(-v, kind="stable")[:top] if fire[t] > 0]

            comps[names[i]] = {
                "density": float(self.density[i]), "mean_ci": float(self.mean_ci[i]),
                "input_tokens": tops(stats_in, self.state["in_fire"][i]),
                "output_tokens": tops(stats_out, self.state["out_fire"][i]),
                "cooccurs_with": [{"name": names[j], "p": float(partners[j])} for j in best]}
        return {"settings": self.meta, "n": self.n, "kind": self.spec.kind,
                "n_subcomponents": len(names), "firing": int(np.sum(self.count > 0)),
                "subcomponents": comps}

    # files
    def save(self, out_dir: str | pathlib.Path) -> pathlib.Path:
        """Writes ``harvest.npz`` (accumulators + settings) and ``summary.json`` into
        ``out_dir``; returns the directory."""
        out_dir = pathlib.Path(out_dir)
        meta = dict(self.meta, spec=dataclasses.asdict(self.spec))
        streaming.save_state(out_dir / "harvest.npz", self.state, meta)
        (out_dir / SUMMARY_FILE).write_text(json.dumps(self.summary(), indent=1))
        return out_dir


def load_harvest(path: str | pathlib.Path) -> Harvest:
    """A saved :class:`Harvest`: ``path`` is a run's workdir (reads
    ``analysis/harvest/harvest.npz``), that directory, or the ``.npz`` itself."""
    spec, state, meta = streaming.load_result(
        path, subdir="harvest", filename="harvest.npz", what="harvest", command="spdjax.harvest",
        spec_type=HarvestSpec, init=init_state)
    return Harvest(spec, state, meta)
