"""An embedded single-node Ray that listens on 127.0.0.1 only.

``ray.init(_node_ip_address="127.0.0.1")`` is not enough: Ray replaces a loopback node address
by the machine's routable one, and then its GCS, raylet, workers and agents listen on every
interface.  Ray keeps everything on the loopback address only where it treats the machine as a
non-cluster host (its ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` switch, read into
``ray._private.ray_constants.ENABLE_RAY_CLUSTER``); :func:`init_local_ray` turns that on for
the duration of ``ray.init`` only, so joining a real cluster (``--address``) is unaffected.
No dashboard web server is started: Ray's headless dashboard process runs but opens no port,
and the dashboard agent binds to 127.0.0.1 as well.
"""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def loopback_only():
    """While active, a new Ray node takes 127.0.0.1 as its address (and binds to it)."""
    try:
        from ray._private import ray_constants
    except ImportError:          # a Ray without this switch: fall back to its default
        yield
        return
    old = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old


def init_local_ray(**kwargs) -> None:
    """``ray.init`` of a new local node bound to 127.0.0.1, without the dashboard web server."""
    import ray
    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("dashboard_host", "127.0.0.1")
    with loopback_only():
        ray.init(_node_ip_address="127.0.0.1", **kwargs)
    _private_token()


def _private_token() -> None:
    """Ray writes the embedded cluster's auth token to ~/.ray/auth_token readable by everyone on
    the machine; make it the owner's only (the token is the key to run code on this Ray)."""
    import os
    path = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    try:
        if os.path.isfile(path) and os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)
    except OSError:
        pass
