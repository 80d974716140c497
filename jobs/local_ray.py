"""Ray started in this process for benchmarks and tests, and a free port of 127.0.0.1.

Ray Train's placement-group cleaner asks the state API, from a Ray worker, whether the Train controller still
lives, and removes the run's placement group when the answer is "unknown". A worker of a Ray without a dashboard
finds no state API of its own: it asks 127.0.0.1:8265, on a shared machine another cluster's dashboard, which
does not know the controller, and the cleaner removes the placement group under live workers (or it finds two
Ray instances and fails). The Ray started here keeps no dashboard (it costs a process and CPU on every test
worker) and its processes are pointed at a state API address that refuses at once: the cleaner's question fails,
and it goes on waiting instead of guessing. It only matters for a controller that dies without shutting down, and
this Ray ends with the process that started it."""

import os
import socket

import ray

NO_STATE_API = "http://127.0.0.1:1"  # nothing listens on port 1: connection refused, no wait


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def init_local_ray(**options) -> None:
    """ray.init for a Ray of this process (or the one already started), without a dashboard.

    The state API address is set in the environment that Ray's processes start with, then this process's own is
    restored: a `ray job submit` from here must still reach the cluster it names."""
    before = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = NO_STATE_API
    try:
        ray.init(ignore_reinit_error=True, include_dashboard=False, log_to_driver=False, **options)
    finally:
        if before is None:
            del os.environ["RAY_API_SERVER_ADDRESS"]
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = before
