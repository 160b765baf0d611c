"""The viewer inside a notebook: :func:`serve_in_notebook` starts the server in a background
thread and shows the page in the cell's output (in Colab through its port proxy)."""

from __future__ import annotations

import pathlib

from spdjax.view import server as server_lib

_SERVERS: dict[str, server_lib.Server] = {}  # one server per workdir and kernel


def in_colab() -> bool:
    try:
        import google.colab  # noqa: F401
    except ImportError:
        return False
    return True


def serve_in_notebook(workdir: str | pathlib.Path, *, port: int = 0, height: int = 800,
                      display: bool = True) -> str:
    """Serves the viewer of ``workdir`` from this kernel (once per workdir: a second call shows
    the same server, or restarts it on ``port`` when that names another port) and displays it:
    in Colab with ``google.colab.output.serve_kernel_port_as_iframe``, elsewhere as an
    ``IPython`` IFrame. Returns the server's local URL.

    In Colab the server accepts any ``Host`` header: the page reaches it through Colab's proxy,
    whose public name the server cannot know, and the runtime's loopback address is reachable
    only through that proxy, so no other page can rebind a name to it (the ``Host`` check in
    :mod:`spdjax.view.server` guards a server on the user's own machine)."""
    key = str(pathlib.Path(workdir).expanduser().resolve())
    old = _SERVERS.get(key)
    if old is not None and port not in (0, old.server_address[1]):
        stop(workdir)  # the caller asked for another port: serve there instead
    if key not in _SERVERS:
        hosts = [server_lib.ANY_HOST] if in_colab() else []
        server = server_lib.make_server(workdir, port=port, allowed_hosts=hosts)
        server_lib.start_in_thread(server)
        _SERVERS[key] = server
    server = _SERVERS[key]
    url = server_lib.url(server)
    if display:
        if in_colab():
            from google.colab import output
            output.serve_kernel_port_as_iframe(server.server_address[1], height=str(height))
        else:
            from IPython.display import IFrame, display as show
            show(IFrame(url, width="100%", height=height))
    return url


def stop(workdir: str | pathlib.Path) -> None:
    """Stops the notebook server of ``workdir`` (if one runs)."""
    server = _SERVERS.pop(str(pathlib.Path(workdir).expanduser().resolve()), None)
    if server is not None:
        server.shutdown()
        server.server_close()
