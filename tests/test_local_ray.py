"""The Ray these tests and the benchmarks start answers Ray Train's liveness question about its own actors."""

import pytest

pytestmark = pytest.mark.ray


def test_the_state_api_of_the_local_ray_sees_its_own_live_actor(ray_local):
    # Ray Train's placement-group cleaner asks this; a None (the actor unknown) made it remove a live run's workers
    from ray.train.v2._internal.state.util import is_actor_alive

    @ray_local.remote(num_cpus=0)
    class Probe:
        def actor_id(self) -> str:
            return ray_local.get_runtime_context().get_actor_id()

        def is_alive(self, actor_id: str):
            return is_actor_alive(actor_id, timeout=10)

    first, second = Probe.remote(), Probe.remote()
    assert ray_local.get(second.is_alive.remote(ray_local.get(first.actor_id.remote()))) is True
