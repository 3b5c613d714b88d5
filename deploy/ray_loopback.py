"""``ray start`` for a node of the loopback cluster of ``deploy/local_cluster.sh``.

    python deploy/ray_loopback.py --sid-file FILE <ray start arguments>

Two things ``ray start`` cannot do by itself:

* **Stay on 127.0.0.1.**  ``ray start --node-ip-address 127.0.0.1`` swaps a loopback address
  for the machine's routable IP (``ray._private.services.resolve_ip_for_localhost``), so the
  nodes of a one-host cluster would register, and talk to each other, on the external
  interface.  This wrapper keeps the address as given.  It also sets
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` in the environment the node's processes (GCS,
  raylet, workers, job drivers) inherit: with it Ray treats 127.0.0.1 as "this node" and
  leaves ``127.0.0.1:PORT`` addresses alone, so drivers started by ``ray job submit`` connect
  over loopback.  Clients outside the cluster need the same variable
  (``deploy/local_cluster.sh env`` prints it).
* **Be stoppable on its own.**  The bare ``ray stop`` kills every Ray on the machine.  The
  wrapper starts a new session (``setsid``) before ``ray start`` and writes the session id to
  ``--sid-file``; every process of the node (GCS, raylet, agents, dashboard, workers, job
  drivers) inherits it, so ``local_cluster.sh stop`` signals exactly those processes.
"""
import os
import sys


def _new_session() -> int:
    try:
        os.setsid()
    except PermissionError:           # already a process-group leader: fork once
        pid = os.fork()
        if pid:
            _, status = os.waitpid(pid, 0)
            os._exit(os.waitstatus_to_exitcode(status))
        os.setsid()
    return os.getsid(0)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "--sid-file":
        print("usage: ray_loopback.py --sid-file FILE <ray start arguments>", file=sys.stderr)
        return 2
    sid_file, args = argv[1], argv[2:]
    sid = _new_session()
    with open(sid_file, "w") as fh:
        fh.write(f"{sid}\n")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray._private.ray_constants as ray_constants
    import ray._private.services as services
    from ray.scripts import scripts

    def keep(host: str) -> str:
        if not host:
            raise ValueError(f"Malformed host: {host!r}")
        return host

    services.resolve_ip_for_localhost = keep
    ray_constants.ENABLE_RAY_CLUSTER = True        # this process may start a worker node
    sys.argv = ["ray", "start", *args]
    return scripts.main()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
