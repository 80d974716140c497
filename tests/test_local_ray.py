"""The Ray these tests and the benchmarks start never tells Ray Train's placement-group cleaner that a live
controller is gone, and leaves this process's environment as it was."""

import os

import pytest

from jobs.local_ray import NO_STATE_API

pytestmark = pytest.mark.ray


def test_the_state_api_question_of_a_local_ray_worker_fails_instead_of_answering_unknown(ray_local):
    # the cleaner goes on waiting on RayStateApiException; a None (the actor unknown) made it remove live workers
    from ray.train.v2._internal.state.util import is_actor_alive
    from ray.util.state.exception import RayStateApiException

    @ray_local.remote(num_cpus=0)
    class Probe:
        def actor_id(self) -> str:
            return ray_local.get_runtime_context().get_actor_id()

        def asks(self, actor_id: str) -> tuple[str, str]:
            try:
                return "answer", repr(is_actor_alive(actor_id, timeout=10))
            except RayStateApiException:
                return "refused", os.environ.get("RAY_API_SERVER_ADDRESS")

    first, second = Probe.remote(), Probe.remote()
    assert ray_local.get(second.asks.remote(ray_local.get(first.actor_id.remote()))) == ("refused", NO_STATE_API)
    assert os.environ.get("RAY_API_SERVER_ADDRESS") is None
