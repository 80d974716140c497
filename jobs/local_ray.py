"""Ray started in this process for benchmarks and tests, and a free port of 127.0.0.1.

Ray Train's placement-group cleaner asks the state API whether the Train controller still lives. A Ray without a
dashboard of its own sends that question to 127.0.0.1:8265, which on a shared machine is another cluster's
dashboard: it does not know the controller, the cleaner takes the run for dead and removes its placement group
under live workers. So the Ray started here has its own dashboard, on a free port of 127.0.0.1."""

import socket

import ray


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def init_local_ray(**options) -> None:
    """ray.init for a Ray of this process (or the one already started), its dashboard on a free local port."""
    ray.init(ignore_reinit_error=True, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=free_port(),
             log_to_driver=False, **options)
