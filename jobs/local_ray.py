"""Ray started in this process for benchmarks and tests, and a free port of 127.0.0.1.

Ray Train's placement-group cleaner asks the state API, from a Ray worker, whether the Train controller still
lives. The worker finds that API by looking for the Ray instances on its machine: with two it fails, and a Ray
without a dashboard sends the question to 127.0.0.1:8265, on a shared machine another cluster's dashboard, which
does not know the controller, so the cleaner takes the run for dead and removes its placement group under live
workers. So the Ray started here has its own dashboard, on a free port of 127.0.0.1, and its workers are told
where (the job's environment, not this process's: a `ray job submit` from here must still reach its own cluster)."""

import socket

import ray


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def init_local_ray(**options) -> None:
    """ray.init for a Ray of this process (or the one already started), its dashboard on a free local port."""
    port = free_port()
    ray.init(ignore_reinit_error=True, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             log_to_driver=False, runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
             **options)
