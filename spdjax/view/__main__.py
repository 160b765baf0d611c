"""``python -m spdjax.view --workdir=DIR``: serves the viewer of a run on a local port;
``--export=OUT`` writes its static copy instead (:mod:`spdjax.view.export`).

Errors a user can fix (a missing workdir, a directory that holds no run, a port in use) are one
``error:`` line (exit 2).
"""

import sys

from absl import app, flags, logging

from spdjax.view import data
from spdjax.view import export as export_lib
from spdjax.view import server as server_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to serve on (0: any free port).")
_HOST = flags.DEFINE_string("host", "127.0.0.1",
                            "Address to bind (0.0.0.0: reachable from other machines).")
_ALLOWED_HOSTS = flags.DEFINE_list(
    "allowed_hosts", [],
    "Host names besides localhost, --host and IP addresses that a request may name (e.g. this "
    "machine's DNS name with --host=0.0.0.0; '*': any, behind a proxy). Other names get 403: "
    "a web page rebinding its own domain to this machine cannot read the viewer.")
_EXPORT = flags.DEFINE_string("export", None,
                              "Write a static copy of the viewer into this directory and exit "
                              "(no server; the graph explorer needs the live server).")


def _fail(message: str):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def main(argv):
    """Serves (or exports) the viewer of ``--workdir`` (absl entry point)."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    if not _WORKDIR.value:
        _fail("--workdir is required: the directory of a run (python -m spdjax.main "
              "--workdir=...).")
    try:
        if _EXPORT.value:
            index = export_lib.export(_WORKDIR.value, _EXPORT.value)
            print(index, flush=True)
            return
        server = server_lib.make_server(_WORKDIR.value, host=_HOST.value, port=_PORT.value,
                                        allowed_hosts=_ALLOWED_HOSTS.value)
    except (ValueError, OSError) as e:
        _fail(str(e.args[-1]) if isinstance(e, server_lib.PortInUseError) else str(e))
    print(f"spdjax view of {data.check_workdir(_WORKDIR.value)}: {server_lib.url(server)} "
          "(Ctrl-C stops)", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def run():
    """Console-script entry point (``spdjax-view``)."""
    app.run(main)


if __name__ == "__main__":
    run()
