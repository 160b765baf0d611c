"""The viewer's server (spdjax/view/server.py), export and command line: routes, errors, the
graph API's HTTP contract (with a stand-in graph module), and the static copy's files."""

import json
import os
import pathlib
import socket
import sys
import types
import urllib.error
import urllib.request

import pytest

from spdjax.view import data, errors, export, notebook, pages, server

from helpers import cli_cases

ROOT = pathlib.Path(__file__).resolve().parents[2]


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def post(url, body: bytes):
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    return get(req)


def test_routes_serve_the_page_the_views_and_the_figures(served, view_runs):
    base = served["tms"]
    status, ctype, body = get(base)
    assert status == 200 and ctype.startswith("text/html")
    assert b"window.SPDJAX_STATIC = false" in body and b'src="static/app.js"' in body
    assert pages.scripts()[-2:] == ["graph_draw.js", "graph_panel.js"]  # drawing, then panel
    for script in pages.scripts():  # the graph explorer's files, in the order they load
        assert f'src="static/{script}"'.encode() in body
        assert get(base + f"static/{script}")[0] == 200
    assert body.index(b"graph_draw.js") < body.index(b"graph_panel.js")
    assert get(base + "static/app.js")[0] == 200
    status, ctype, body = get(base + "api/run.json")
    assert status == 200 and json.loads(body) == json.loads(json.dumps(
        data.run_view(view_runs["tms"])))
    status, _, body = get(base + "api/sites/1.json")
    assert status == 200 and json.loads(body)["site"] == "linear2"
    status, ctype, body = get(base + "figures/combined_diagram.png")
    assert status == 200 and ctype == "image/png" and body[:4] == b"\x89PNG"
    for bad, message in (("api/sites/9.json", "No site 9: the run has 2 sites"),
                         ("api/sites/x.json", "sites are numbered"),
                         ("static/../data.py", "No file"), ("figures/../config.json", "No file"),
                         ("nope", "No page /nope")):
        status, ctype, body = get(base + bad)
        assert status == 404 and message in json.loads(body)["error"], (bad, body)


def test_graph_api_errors_are_400_with_the_message(served, monkeypatch):
    calls = []

    def graph_json(run, body):
        calls.append((run, body))
        if not body.get("prompt"):
            raise errors.BadRequest("prompt must be a non-empty string; got ''.")
        return {"nodes": [], "run": run.workdir.name}

    stand_in = types.SimpleNamespace(graph_json=graph_json, intervene_json=graph_json)
    monkeypatch.setattr(server, "graph_module", lambda: stand_in)
    lm = served["lm"]
    status, _, body = post(lm + "api/graph", b'{"prompt": "1 2 3"}')
    assert status == 200 and json.loads(body) == {"nodes": [], "run": "lm"}
    status, _, body = post(lm + "api/intervene", b'{"prompt": ""}')
    assert status == 400 and json.loads(body) == {
        "error": "prompt must be a non-empty string; got ''."}
    assert post(lm + "api/graph", b"{not json")[0] == 400
    status, _, body = post(lm + "api/graph", b"[1]")
    assert status == 400 and "must be a JSON object, got list" in json.loads(body)["error"]
    assert post(lm + "api/nope", b"{}")[0] == 404
    status, _, body = post(served["tms"] + "api/graph", b'{"prompt": "x"}')
    assert status == 400 and "for language-model runs; this run is tms" in json.loads(body)[
        "error"]
    assert len(calls) == 2 and calls[0][0] is calls[1][0]  # loaded once, passed to both


def test_an_internal_value_error_is_a_500_not_bad_input(served, monkeypatch, capfd):
    # A ValueError from inside the computation (a NumPy/JAX shape bug) is not the user's fault:
    # one line as the 500's message, the traceback on stderr.
    def graph_json(run, body):
        import numpy as np
        return np.zeros(3).reshape(2, 2)

    stand_in = types.SimpleNamespace(graph_json=graph_json, intervene_json=graph_json)
    monkeypatch.setattr(server, "graph_module", lambda: stand_in)
    status, _, body = post(served["lm"] + "api/graph", b'{"prompt": "1 2 3"}')
    assert status == 500 and json.loads(body) == {
        "error": "ValueError: cannot reshape array of size 3 into shape (2,2)"}
    assert "Traceback" in capfd.readouterr().err


def test_a_notebook_serves_in_a_thread_and_shows_it(view_runs, monkeypatch):
    wd = view_runs["tms"]
    shown = []
    monkeypatch.setattr(notebook, "_SERVERS", {})
    try:
        url = notebook.serve_in_notebook(wd, display=False)  # returns: served in a thread
        status, _, body = get(url + "api/run.json")
        assert status == 200 and json.loads(body)["name"] == "tms"
        # Colab: the page through the kernel's port proxy, the same server as before
        output = types.SimpleNamespace(serve_kernel_port_as_iframe=lambda port, height: shown
                                       .append((port, height)))
        colab = types.ModuleType("google.colab")
        colab.output = output
        monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
        monkeypatch.setitem(sys.modules, "google.colab", colab)
        monkeypatch.setitem(sys.modules, "google.colab.output", output)
        assert notebook.in_colab()
        assert notebook.serve_in_notebook(wd, height=500) == url
        assert shown == [(int(url.rsplit(":", 1)[1].strip("/")), "500")]
    finally:
        notebook.stop(wd)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)


def test_a_port_in_use_is_named(view_runs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(server.PortInUseError, match=f"port {port} on 127.0.0.1 is in use"):
            server.make_server(view_runs["tms"], port=port)
    with pytest.raises(ValueError, match="port must be an int in"):
        server.make_server(view_runs["tms"], port=70000)


def test_export_writes_the_page_and_every_view(view_runs, tmp_path):
    index = export.export(view_runs["tms"], tmp_path / "out")
    out = index.parent
    assert "window.SPDJAX_STATIC = true" in index.read_text()
    assert (out / "static" / "app.js").is_file() and not (out / "static" / "index.html").exists()

    def read(path):  # spdjaxData(name, value);
        text = path.read_text()
        name, _, value = text[len("spdjaxData("):-len(");\n")].partition(", ")
        return json.loads(name), json.loads(value)

    name, run = read(out / "data" / "run.js")
    assert name == "run" and run == json.loads(json.dumps(data.run_view(view_runs["tms"])))
    for i, s in enumerate(run["sites"]):
        assert read(out / "data" / "sites" / f"{i}.js") == (
            f"sites/{i}", json.loads(json.dumps(data.site_view(view_runs["tms"], s["name"]))))
    assert {p.name for p in (out / "figures").iterdir()} == {f["file"] for f in run["figures"]}
    export.export(view_runs["tms"], out)  # again: replaced, not merged
    with pytest.raises(ValueError, match="inside the run's workdir"):
        export.export(view_runs["tms"], view_runs["tms"] / "view")


def _cli_cases(*cases: list[str]) -> list[tuple[int, str, str]]:
    """``(exit code, stdout, stderr)`` of ``python -m spdjax.view`` with each argument list."""
    p, results = cli_cases("spdjax.view.__main__", "spdjax-view", cases, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return results


def test_command_line_errors_are_one_line(tmp_path, view_runs):
    tms = view_runs["tms"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        missing, empty, busy, exported = _cli_cases(
            [f"--workdir={tmp_path / 'missing'}"], [f"--workdir={tmp_path}"],
            [f"--workdir={tms}", f"--port={port}"],
            [f"--workdir={tms}", f"--export={tmp_path / 'x'}"])
    assert missing[0] == 2 and missing[2].strip().splitlines() == [
        f"error: --workdir={tmp_path / 'missing'}: no such directory."]
    assert empty[0] == 2 and empty[2].strip().splitlines()[-1].startswith(
        f"error: --workdir={tmp_path} holds no run: expected config.json or checkpoints/")
    assert busy[0] == 2 and busy[2].strip().splitlines() == [
        f"error: port {port} on 127.0.0.1 is in use: pick another with --port (or --port=0 "
        "for any free one)."]
    assert exported[0] == 0 and exported[1].strip() == str(tmp_path / "x" / "index.html")
    assert os.path.isfile(tmp_path / "x" / "data" / "run.js")


@pytest.mark.slow  # trains four more tiny runs; the default tests cover the code on TMS and LM
def test_every_family_and_method_is_served_and_exported(tmp_path):
    import tiny_runs

    runs = tiny_runs.make(tmp_path / "runs", labels=("tms_apd", "tms_vpd", "resid_mlp", "l3d"))
    labels = {"tms_apd": "APD", "tms_vpd": "SPD (VPD recipe)", "resid_mlp": "SPD", "l3d": "L3D"}
    for label, wd in sorted(runs.items(), key=lambda kv: kv[0] == "resid_mlp"):  # it last
        s = server.make_server(wd)
        server.start_in_thread(s)
        try:
            status, _, body = get(server.url(s) + "api/run.json")
            run = json.loads(body)
            assert status == 200 and run["evaluation"], label
            if run["harvest"]:
                status, _, body = get(server.url(s) + "api/sites/0.json")
                assert status == 200 and json.loads(body)["subcomponents"], label
        finally:
            s.shutdown()
            s.server_close()
        assert run["method_label"] == labels[label]
        if label == "l3d":  # its summary and figures; no CI: said so, no harvest asked for
            assert run["method"] == "l3d" and "recon_error" in dict(run["evaluation"])
            assert "not causal importances" in run["missing"]["ci"]
            assert "harvest" not in run["missing"] and any(f["family"] for f in run["figures"])
        index = export.export(wd, tmp_path / f"{label}_view")
        assert (index.parent / "data" / "run.js").is_file()
    assert run["family"] == "resid_mlp" and any(f["family"] for f in run["figures"])
