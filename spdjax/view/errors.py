"""The viewer's error for a request it cannot answer as asked (HTTP 400).

Its own module so the server can tell bad input from a bug without importing the graph API
(which brings in the model code): only :class:`BadRequest` is a 400; any other exception,
a ``ValueError`` from NumPy or JAX included, is a bug and the server's 500.
"""


class BadRequest(ValueError):
    """Bad input to the graph API (a body, prompt, node or run it cannot use); the message
    names the bad value and what was expected. A ``ValueError``, so callers outside the server
    may catch either."""
