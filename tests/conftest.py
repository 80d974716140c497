"""Shared fixtures: small real gensim word vectors, one real local Ray instance per test process, a small VAE,
a demo shard set and a tiny model trained on it (each built once per session and shared by the pytest-xdist
workers), and the `ray` marker's rules."""

import json
import os
import shutil
import sys
from pathlib import Path

# Ray reads its auth mode when imported: token auth on, the same for every process the tests start.
os.environ["RAY_AUTH_MODE"] = "token"
# Serve kills an HTTP proxy that is not ready within 5 s; on two busy cores starting one can take longer.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
# One thread per process (read when torch is imported; inherited by the jobs the tests start): the suite runs as
# parallel workers beside Ray's, and torch processes that each spin two threads on two cores slow each other
# down far more than twice.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Every Ray Train run starts an actor that watches for preempted (spot) nodes: a fresh process of its own, which
# nothing here can use (the cluster tests stop nodes themselves). Inherited by the clusters the tests start.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
from filelock import FileLock  # noqa: E402
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


RAY_FIXTURES = {"ray_local", "cluster", "sweep_cluster"}  # the local clusters: test_cluster.py, test_tune.py


def ray_started() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


# The longest files first, each a unit of work for one of the two xdist workers (`make test`: --dist loadfile):
# the cluster scenario starts at once, and what the other worker does meanwhile balances it.
FIRST = ("test_cluster.py", "test_tune.py", "test_faults.py", "test_readme.py", "test_benchmark.py", "test_serve.py")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """A test that uses a Ray fixture is a `ray` test whether it says so or not (`make test-fast` leaves them out);
    the files in FIRST run first."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
    items.sort(key=lambda item: FIRST.index(item.path.name) if item.path.name in FIRST else len(FIRST))


@pytest.fixture(autouse=True)
def _ray_only_where_marked(request):
    """A test not marked `ray` that starts Ray in this process fails, so `make test-fast` stays without Ray."""
    before = ray_started()
    yield
    if not before and ray_started() and request.node.get_closest_marker("ray") is None:
        pytest.fail("this test started Ray: mark it `ray` (make test-fast runs without Ray)")


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray instance for the whole session (token auth on, as on a cluster)."""
    import ray

    from jobs.local_ray import init_local_ray

    init_local_ray(address="local", num_cpus=2)
    yield ray
    ray.shutdown()


# 240 training samples in shards of 100: three shards, which two training workers cannot split evenly.
DEMO_SAMPLES, DEMO_SHARD_SIZE = 300, 100


VAE_STEPS = 200


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder `build(folder)` fills, once per test session: the pytest-xdist workers share it (a file lock,
    in the folder the workers' temporary folders share)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder = root / name
    with FileLock(f"{folder}.lock"):
        if not (folder / ".built").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


@pytest.fixture(scope="session")
def demo_vae(tmp_path_factory):
    """A small VAE trained for VAE_STEPS steps on demo images (dataprep.vae.train_vae, as dataprep trains one):
    (its result, its log lines, its folder). The demo set's autoencoder."""
    import numpy as np

    from dataprep import shapes
    from dataprep.vae import train_vae

    def build(folder: Path) -> None:
        log = []
        images = np.stack([sample.image for sample in shapes.generate(512, seed=0)])
        result = train_vae(images, str(folder / "vae"), steps=VAE_STEPS, batch_size=32, log=log.append)
        (folder / "result.json").write_text(json.dumps({"result": result, "log": log}))

    folder = built_once(tmp_path_factory, "demo-vae", build)
    saved = json.loads((folder / "result.json").read_text())
    return saved["result"], saved["log"], folder / "vae"


@pytest.fixture(scope="session")
def demo_set(tmp_path_factory, demo_vae):
    """The built-in demo data at test size (tiny preset: 4x8x8 latents, L=16, E=16), made by dataprep in this
    process (no Ray: dataprep's Ray Data path is tested in test_dataprep) with the session's autoencoder (dataprep
    training one is tested in test_shapes)."""
    from dataprep.__main__ import main as dataprep_main

    def build(out: Path) -> None:
        shutil.copytree(demo_vae[2], out / "vae")
        code = dataprep_main(["demo", "--out", str(out), "--samples", str(DEMO_SAMPLES), "--vae", str(out / "vae"),
                              "--samples-per-shard", str(DEMO_SHARD_SIZE), "--val-fraction", "0.2", "--word-dim",
                              "16", "--encoder-actors", "0"])
        assert code == 0

    return built_once(tmp_path_factory, "demo", build)


@pytest.fixture(scope="session")
def tiny_model(demo_set, tmp_path_factory):
    """A tiny model trained briefly on the demo shards with the training step (psunet.training), bundled the way
    jobs/train.py bundles it."""
    return built_once(tmp_path_factory, "tiny-model", lambda root: train_tiny_model(demo_set, root)) / "model"


def train_tiny_model(demo_set: Path, root: Path) -> None:
    from jobs.config import load_config
    from psunet.checkpoint import save_checkpoint
    from psunet.data import make_loader
    from psunet.model import PSUNet
    from psunet.model_folder import ASSETS, assets_for, bundle
    from psunet.training import Trainer

    cfg = load_config("configs/tiny.yaml", [f"data.train={demo_set}/train", f"data.val={demo_set}/val"]).resolved()
    optim = cfg.optim.model_copy(update={"steps": 60, "batch_size": 16, "lr": 2e-3})
    torch.manual_seed(0)
    trainer = Trainer(PSUNet(cfg.model), optim, cfg.diffusion, torch.device("cpu"))
    batches = iter(make_loader(cfg.data.train, optim.batch_size, cfg.model, training=True, seed=0, rank=0,
                               world_size=1))
    for step in range(optim.steps):
        trainer.step(step, [next(batches)])
    checkpoint = save_checkpoint(root / "checkpoint", trainer.model, trainer.ema.state_dict(), trainer.optimizer,
                                 {"step": optim.steps},
                                 {"model": cfg.model.model_dump(), "diffusion": cfg.diffusion.model_dump()})
    (checkpoint / ASSETS).write_text(json.dumps(assets_for(cfg.data.train)))
    bundle(checkpoint, root / "model")
