"""The viewer's data layer (spdjax/view/data.py) against the run's own files and the harvest's
own statistics, on tiny runs of TMS and the induction-head LM."""

import dataclasses
import json
import math

import numpy as np
import pytest

from spdjax.analysis import harvest_result
from spdjax.view import data

import tiny_runs


def test_run_view_reads_the_runs_files(view_runs):
    wd = view_runs["tms"]
    v = data.run_view(wd)
    json.dumps(v, allow_nan=False)  # what a browser can parse
    assert (v["family"], v["family_title"], v["method"]) == ("tms", "TMS", "spd")
    assert v["method_label"] == "SPD"
    assert v["checkpoints"] == [2] and not v["is_lm"]
    summary = json.loads((wd / "summary.json").read_text())
    rows = dict(map(tuple, v["evaluation"]))
    assert rows["mmcs"] == summary["mmcs"] and rows["loss/total"] == summary["loss"]["total"]
    logged = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    assert v["curves"]["loss/total"] == [[m["step"], m["loss/total"]] for m in logged
                                         if "loss/total" in m]
    figs = {f["file"]: f["family"] for f in v["figures"]}
    assert figs["combined_diagram.png"] is True and figs["training_curves.png"] is False
    assert [s["name"] for s in v["sites"]] == ["linear1", "linear2"]
    assert [s["C"] for s in v["sites"]] == [6, 6]
    assert v["harvest"]["kind"] == "features" and v["clustering"]["seeds"] == ["0"]
    assert v["missing"] == {}


def test_what_is_missing_is_named_with_its_command():
    v = data.run_view(tiny_runs.LM_FIXTURE)
    wd = str(tiny_runs.LM_FIXTURE)
    assert v["missing"]["harvest"] == f"no harvest yet: python -m spdjax.harvest --workdir={wd}"
    assert v["missing"]["figures"].endswith(f"python -m spdjax.cli.plot --workdir={wd}")
    assert "clustering" in v["missing"] and "summary" in v["missing"]
    assert v["is_lm"] and v["evaluation"] == []
    # sites from the logged CI-L0 until a harvest says their C
    assert {s["name"] for s in v["sites"]} >= {"blocks_0/attn/q", "blocks_1/attn/out"}
    assert all(s["C"] is None for s in v["sites"])
    site = data.site_view(tiny_runs.LM_FIXTURE, "blocks_0/attn/q")
    assert site["harvest"] is None and "python -m spdjax.harvest" in site["missing"]["harvest"]


def test_site_view_of_a_language_model_matches_the_harvest(view_runs):
    wd = view_runs["lm"]
    h = harvest_result.load_harvest(wd)
    site = h.spec.sites[0]
    v = data.site_view(wd, site)
    json.dumps(v, allow_nan=False)
    comps = v["subcomponents"]
    assert len(comps) == v["C"] == h.spec.sizes[0]
    counts = [c["count"] for c in comps]
    assert counts == sorted(counts, reverse=True)  # sorted by use
    top = comps[0]
    i = h.index(top["name"])
    assert top["count"] == h.count[i] > 0
    assert math.isclose(top["density"], h.density[i]) and math.isclose(top["mean_ci"],
                                                                       h.mean_ci[i])
    assert [t["token"] for t in top["input_tokens"]] == [t for t, _ in h.top_tokens(
        top["name"], 5, which="input")]
    ex = top["examples"]
    assert len(ex) == len(h.examples(top["name"])) and ex[0]["ci"] == max(e["ci"] for e in ex)
    for e in ex:  # the window: every kept token with its CI, the firing token at center
        assert len(e["tokens"]) == len(e["token_ci"]) and e["tokens"][0].isdigit()
        assert math.isclose(e["token_ci"][e["center"]], e["ci"], rel_tol=1e-6)
    hist = v["histograms"]
    assert sum(hist["log10_density"]["counts"]) == v["firing"] == int(np.sum(
        h.count[:h.spec.sizes[0]] > 0))
    assert sum(hist["mean_ci"]["counts"]) == v["C"]
    with pytest.raises(ValueError, match="No site 'nope'"):
        data.site_view(wd, "nope")


def test_site_view_of_a_toy_lists_inputs_and_clusters(view_runs):
    wd = view_runs["tms"]
    v = data.site_view(wd, "linear1")
    clusters = json.loads((wd / "analysis" / "clustering" / "clustering.json").read_text())
    members = clusters["seeds"]["0"]["members"]
    for c in v["subcomponents"]:
        if c["cluster"] is not None:
            assert c["name"] in members[c["cluster"]]
            assert v["clusters"]["members"][str(c["cluster"])] == members[c["cluster"]]
        for e in c.get("examples", []):
            assert all(x != 0 for _, x in e["inputs"])  # the active features only
    fired = [c for c in v["subcomponents"] if c["count"]]
    assert fired and all(t["text"].startswith("x") for t in fired[0]["input_tokens"])


def test_check_workdir_names_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        data.check_workdir(tmp_path / "missing")
    (tmp_path / "f").write_text("")
    with pytest.raises(data.NotARunError, match="is a file"):
        data.check_workdir(tmp_path / "f")
    with pytest.raises(data.NotARunError, match="holds no run: expected config.json"):
        data.check_workdir(tmp_path)


def test_curves_are_subsampled_and_nan_is_null():
    lines = [{"step": s, "loss": float(s), "note": "x"} for s in range(1000)]
    lines.append({"step": 1000, "loss": float("nan")})
    c = data.curves(lines, max_points=10)
    assert len(c["loss"]) == 10 and c["loss"][0] == [0, 0.0] and c["loss"][-1][0] == 1000
    assert "note" not in c
    assert data.jsonable(c)["loss"][-1] == [1000, None]
    assert data.jsonable({"a": np.float32(np.inf), "b": np.int64(3)}) == {"a": None, "b": 3}


def test_runs_are_labelled_by_method_and_recipe(tmp_path):
    assert data.method_label({}) == data.method_label({"method": "spd"}) == "SPD"
    vpd = {"method": "spd", "losses": {"delta_l2": {}, "stochastic_pgd_recon_subset": {}}}
    assert data.method_label(vpd) == "SPD (VPD recipe)"
    assert data.method_label({"method": "spd", "losses": {"stochastic_recon": {}}}) == "SPD"
    assert data.method_label({"method": "apd", "losses": vpd["losses"]}) == "APD"
    assert data.method_label({"method": "l3d"}) == "L3D"
    assert data.method_label({"method": "mine"}) == "MINE"
    # An L3D run has no CI: the page says so instead of asking for a harvest or a clustering.
    (tmp_path / "config.json").write_text(json.dumps({"experiment": "tms", "method": "l3d"}))
    v = data.run_view(tmp_path)
    assert v["method_label"] == "L3D" and v["sites"] == []
    assert "not causal importances" in v["missing"]["ci"]
    assert "harvest" not in v["missing"] and "clustering" not in v["missing"]


def test_a_text_lm_shows_tokens_with_its_tokenizer(tmp_path):
    """A Llama run's token ids are decoded by its corpus's BPE tokenizer (a tiny corpus here,
    built into the test session's cache); an unreadable corpus leaves ids and says why."""
    from spdjax.families.lm import model as lm_model

    text = tmp_path / "corpus.txt"
    text.write_text("the cat sat on the mat; the dog sat on the log. " * 400)
    recipe = {"text_files": str(text), "vocab_size": 300, "seq_len": 8}
    config = {"experiment": "lm", "variant": "llama_2x128", "target_recipe": recipe}
    decode, why_not = data.token_decoder(config)
    assert why_not is None
    cfg = dataclasses.replace(lm_model.VARIANTS["llama_2x128"], **recipe)
    tok = lm_model.text_corpus(cfg)[2]
    the = tok.encode(" the").ids
    assert len(the) == 1 and decode(the[0]) == " the"
    assert all(decode(i) == tok.decode([i], skip_special_tokens=False) for i in range(257, 300))
    missing = dict(config, target_recipe=dict(recipe, text_files=str(tmp_path / "none*.txt")))
    decode, why_not = data.token_decoder(missing)
    assert decode(12) == "12" and why_not.startswith("tokens shown as ids")
    assert data.token_decoder({"experiment": "tms"})[0](3) == "3"
