"""The viewer server's defences (spdjax/view/server.py): request bodies whose length is not a
byte count, Host names of other sites (DNS rebinding), cross-site POSTs without a JSON content
type, 404 kept for what does not exist and 500 for bugs, per-site locks, and the URL of an IPv6
wildcard bind; the notebook helper's port and its Colab Host rule. Raw sockets send what a
browser or urllib would not."""

import json
import socket
import sys
import threading
import types

import pytest

from spdjax.view import data, notebook, server


@pytest.fixture
def tms_server(view_runs):
    """A live server of the tiny TMS run (its own, so a test may change its allowed hosts)."""
    servers = []

    def start(**kw):
        s = server.make_server(view_runs["tms"], **kw)
        server.start_in_thread(s)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def raw(srv, request: bytes, *, timeout=10) -> tuple[int, dict]:
    """Sends ``request`` as is; ``(status, JSON body)`` of the answer."""
    with socket.create_connection(srv.server_address[:2], timeout=timeout) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body else {}


def request(srv, method="GET", path="/api/run.json", *, host="auto", headers=(), body=b""):
    port = srv.server_address[1]
    lines = [f"{method} {path} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {f'127.0.0.1:{port}' if host == 'auto' else host}")
    lines += [*headers, "Connection: close"]
    return raw(srv, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)


JSON = "Content-Type: application/json"


def test_a_content_length_that_is_no_byte_count_is_400_at_once(tms_server):
    srv = tms_server()
    for length in ("-1", "-100", "abc", "1e3"):  # rfile.read(-1) would wait for the socket
        status, body = request(srv, "POST", "/api/graph", headers=(
            JSON, f"Content-Length: {length}"), body=b'{"prompt": "x"}')
        assert status == 400 and body["error"] == (
            f"Content-Length {length!r} is not a byte count (an integer >= 0)."), length
    status, body = request(srv, "POST", "/api/graph", headers=(
        JSON, f"Content-Length: {server.MAX_BODY + 1}"))
    assert status == 413 and f"at most {server.MAX_BODY}" in body["error"]
    # a well-formed request still reaches the graph API's checks (a TMS run: no graphs)
    status, body = request(srv, "POST", "/api/graph", headers=(JSON, "Content-Length: 2"),
                           body=b"{}")
    assert status == 400 and "for language-model runs" in body["error"]


def test_a_host_naming_another_site_is_403(tms_server):
    srv = tms_server()
    port = srv.server_address[1]
    for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example",
                 f"127.0.0.1.nip.io:{port}"):
        for method, path, headers in (("GET", "/api/run.json", ()), ("GET", "/", ()),
                                      ("POST", "/api/graph", (JSON, "Content-Length: 0"))):
            status, body = request(srv, method, path, host=host, headers=headers)
            assert status == 403 and body["error"].startswith(
                f"Host {host!r} is not this server's name"), (host, path)
    for host in ("localhost", f"localhost:{port}", f"LOCALHOST.:{port}", f"127.0.0.1:{port}",
                 f"[::1]:{port}", "[::1]", f"192.168.1.5:{port}", None):  # None: no Host
        status, body = request(srv, host=host)
        assert status == 200 and body["name"] == "tms", host
    named = tms_server(allowed_hosts=["mybox.lan"])
    assert request(named, host=f"mybox.lan:{port}")[0] == 200
    assert request(named, host="evil.example")[0] == 403
    assert request(tms_server(allowed_hosts=["*"]), host="evil.example")[0] == 200
    with pytest.raises(ValueError, match="allowed_hosts must be a list of names; got the str"):
        server.make_server(srv.state.workdir, allowed_hosts="mybox")
    with pytest.raises(ValueError, match=r"non-empty host names \(or '\*'\); got \[''\]"):
        server.make_server(srv.state.workdir, allowed_hosts=[""])


def test_host_names_are_parsed_from_the_header():
    assert [server.host_name(h) for h in ("Example.org.:80", "[::1]:8000", "[::1]", "a", "")] \
        == ["example.org", "::1", "::1", "a", ""]
    allowed = frozenset(server.LOCAL_HOSTS)
    assert server.host_allowed("10.0.0.2:80", allowed) and server.host_allowed(None, allowed)
    assert not server.host_allowed("", allowed) and not server.host_allowed("a.b", allowed)


def test_a_post_that_is_not_json_is_415(tms_server, view_runs, monkeypatch):
    calls = []
    stand_in = types.SimpleNamespace(graph_json=lambda run, body: calls.append(body) or {})
    monkeypatch.setattr(server, "graph_module", lambda: stand_in)
    srv = server.make_server(view_runs["lm"], loader=lambda wd: "run")
    server.start_in_thread(srv)
    try:
        body = b'{"prompt": "1 2"}'
        for ctype in ("text/plain", "application/x-www-form-urlencoded",
                      "multipart/form-data; boundary=x", None):
            headers = [f"Content-Length: {len(body)}"]
            if ctype:
                headers.append(f"Content-Type: {ctype}")
            status, answer = request(srv, "POST", "/api/graph", headers=headers, body=body)
            assert status == 415 and answer["error"] == (
                f"The request's Content-Type is {ctype!r}; the graph API takes "
                "application/json."), ctype
        assert calls == []
        status, _ = request(srv, "POST", "/api/graph", headers=(
            "Content-Type: application/json; charset=utf-8", f"Content-Length: {len(body)}"),
            body=body)
        assert status == 200 and calls == [{"prompt": "1 2"}]
    finally:
        srv.shutdown()
        srv.server_close()


def test_missing_things_are_404_and_bugs_are_500(tms_server, monkeypatch, capfd):
    srv = tms_server()
    assert request(srv, path="/api/sites/9.json") == (
        404, {"error": "No site 9: the run has 2 sites."})
    assert request(srv, path="/api/sites/x.json")[0] == 404
    assert request(srv, path="/nope") == (404, {"error": "No page /nope."})

    def broken(workdir):
        raise KeyError("evaluation")  # a bug in a view: not "not found"

    monkeypatch.setattr(data, "run_view", broken)
    assert request(srv) == (500, {"error": "KeyError: 'evaluation'"})
    assert request(srv, path="/api/sites/0.json") == (500, {"error": "KeyError: 'evaluation'"})
    err = capfd.readouterr().err
    assert "Traceback" in err and 'raise KeyError("evaluation")' in err

    def multiline(workdir):
        raise RuntimeError("first line\nsecond line")

    monkeypatch.setattr(data, "run_view", multiline)
    assert request(srv) == (500, {"error": "RuntimeError: first line"})


def test_a_slow_view_or_model_load_does_not_hold_up_other_sites(view_runs, monkeypatch):
    release, started = threading.Event(), threading.Event()
    computed, loads = [], []
    real = data.site_view

    def site_view(workdir, site):
        computed.append(site)
        if site == "linear1":
            started.set()
            assert release.wait(30)
        return real(workdir, site)

    def loader(workdir):
        loads.append(workdir)
        assert release.wait(30)
        return "run"

    monkeypatch.setattr(data, "site_view", site_view)
    state = server.RunState(view_runs["tms"], loader=loader)
    slow = [threading.Thread(target=state.site_view, args=(0,)) for _ in range(2)]
    slow += [threading.Thread(target=state.loaded_run) for _ in range(2)]
    for t in slow:
        t.start()
    assert started.wait(30)
    done = []
    other = threading.Thread(target=lambda: done.append(state.site_view(1)))
    other.start()
    other.join(30)  # served while site 0 computes and the model loads
    assert done and done[0]["site"] == "linear2" and not release.is_set()
    release.set()
    for t in slow:
        t.join(30)
    assert computed.count("linear1") == 1 and len(loads) == 1  # each computed once
    assert state.loaded_run() == "run" and state.site_view(0)["site"] == "linear1"
    assert computed.count("linear1") == 1


def test_the_url_of_a_wildcard_bind_is_the_loopback_address():
    def url(*address):
        return server.url(types.SimpleNamespace(server_address=address))

    assert url("0.0.0.0", 8000) == "http://127.0.0.1:8000/"
    assert url("", 8000) == "http://127.0.0.1:8000/"
    assert url("::", 8000, 0, 0) == "http://[::1]:8000/"
    assert url("fe80::1", 8000, 0, 0) == "http://[fe80::1]:8000/"
    assert url("127.0.0.1", 8000) == "http://127.0.0.1:8000/"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_notebook_moves_to_a_new_port_and_in_colab_accepts_its_proxy_host(
        view_runs, monkeypatch):
    wd = view_runs["tms"]
    monkeypatch.setattr(notebook, "_SERVERS", {})
    try:
        first = notebook.serve_in_notebook(wd, display=False)
        assert notebook.serve_in_notebook(wd, display=False) == first  # port=0: the same one
        port = _free_port()
        moved = notebook.serve_in_notebook(wd, port=port, display=False)
        assert moved == f"http://127.0.0.1:{port}/" and moved != first
        srv = notebook._SERVERS[str(wd.resolve())]
        assert request(srv, host="abc-8000-colab.googleusercontent.com")[0] == 403
        notebook.stop(wd)
        colab = types.ModuleType("google.colab")
        colab.output = types.SimpleNamespace(serve_kernel_port_as_iframe=lambda *a, **k: None)
        monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
        monkeypatch.setitem(sys.modules, "google.colab", colab)
        notebook.serve_in_notebook(wd)
        srv = notebook._SERVERS[str(wd.resolve())]
        status, body = request(srv, host="abc-8000-colab.googleusercontent.com")
        assert status == 200 and body["name"] == "tms"
    finally:
        notebook.stop(wd)
