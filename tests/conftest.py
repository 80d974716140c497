"""Shared fixtures: small real gensim word vectors, one real local Ray instance, a small demo shard set,
a tiny model trained on it."""

import os

# Ray reads its auth mode when imported: token auth on, the same for every process the tests start.
os.environ["RAY_AUTH_MODE"] = "token"
# Serve kills an HTTP proxy that is not ready within 5 s; on two busy cores starting one can take longer.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")

import pytest  # noqa: E402
import torch  # noqa: E402
from gensim.models import Word2Vec  # noqa: E402

CAPTIONS = [
    "a small red circle on the left",
    "a large blue square at the top",
    "a big green triangle in the middle",
    "a tiny yellow box at the bottom",
    "a small cyan disc on the right",
    "a large magenta square on the left and a small red circle on the right",
]


@pytest.fixture(scope="session")
def word_vectors():
    sentences = [caption.split() for caption in CAPTIONS] * 20
    return Word2Vec(sentences, vector_size=16, min_count=1, window=3, seed=0, workers=1, epochs=5).wv


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance for the whole session (token auth on, as on a cluster)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()


# 240 training samples in shards of 100: three shards, which two training workers cannot split evenly.
DEMO_SAMPLES, DEMO_SHARD_SIZE = 300, 100


@pytest.fixture(scope="session")
def demo_set(tmp_path_factory, ray_local):
    """The built-in demo data at test size (tiny preset: 4x8x8 latents, L=16, E=16), made by dataprep."""
    from dataprep.__main__ import main as dataprep_main

    out = tmp_path_factory.mktemp("demo")
    code = dataprep_main(["demo", "--out", str(out), "--samples", str(DEMO_SAMPLES), "--vae-steps", "200",
                          "--samples-per-shard", str(DEMO_SHARD_SIZE), "--val-fraction", "0.2", "--word-dim", "16"])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def tiny_model(demo_set, tmp_path_factory):
    """A tiny model trained briefly on the demo shards with the training step (psunet.training), bundled the way
    jobs/train.py bundles it."""
    import json

    from jobs.config import load_config
    from psunet.checkpoint import save_checkpoint
    from psunet.data import make_loader
    from psunet.model import PSUNet
    from psunet.model_folder import ASSETS, assets_for, bundle
    from psunet.training import Trainer

    cfg = load_config("configs/tiny.yaml", [f"data.train={demo_set}/train", f"data.val={demo_set}/val"]).resolved()
    optim = cfg.optim.model_copy(update={"steps": 60, "batch_size": 16, "lr": 2e-3})
    trainer = Trainer(PSUNet(cfg.model), optim, cfg.diffusion, torch.device("cpu"))
    batches = iter(make_loader(cfg.data.train, optim.batch_size, cfg.model, training=True, seed=0, rank=0,
                               world_size=1))
    for step in range(optim.steps):
        trainer.step(step, [next(batches)])
    root = tmp_path_factory.mktemp("model")
    checkpoint = save_checkpoint(root / "checkpoint", trainer.model, trainer.ema.state_dict(), trainer.optimizer,
                                 {"step": optim.steps}, {"model": cfg.model.model_dump(), "diffusion": cfg.diffusion.model_dump()})
    (checkpoint / ASSETS).write_text(json.dumps(assets_for(cfg.data.train)))
    return bundle(checkpoint, root / "model")
