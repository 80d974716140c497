"""jobs/serve.py on a real local Ray instance with a tiny trained model: every endpoint over real HTTP, a table of
bad requests (4xx with a reason, service still healthy), batching under concurrent load, and the web page in
headless Chromium."""

import base64
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from jobs.local_ray import free_port
from jobs.serve import ServeArgs, app
from psunet.config import DiffusionConfig
from psunet.diffusion import SCHEDULERS, schedulers_for

pytestmark = pytest.mark.ray
PROMPT = "a small red circle on the left"


@pytest.fixture(scope="module")
def service(ray_local, tiny_model):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app({"model": str(tiny_model), "max_samples": 4, "max_steps": 50, "max_prompt_chars": 80,
                   "max_image_side": 256, "max_body_bytes": 200_000, "batch_wait_timeout_s": 0.2,
                   "num_cpus": 1, "default_guidance_scale_text": 2.0}),  # a default of its own for the text
              name="psunet", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def long_runs(service, tiny_model):
    """A second application under /long for runs long enough to cancel or kill: the browser test, then the
    replica-kill test (last: it kills this application's model replica)."""
    from ray import serve

    serve.run(app({"model": str(tiny_model), "max_steps": 1000, "request_timeout_s": 60, "num_cpus": 0.5,
                   "default_guidance_scale_text": 2.0}),
              name="long", route_prefix="/long")  # behind a path prefix: the page's requests are relative
    yield f"{service}/long"
    serve.delete("long")


def _png(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _image(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


def _picture(side: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (side, side, 3), dtype=np.uint8)


def _gif() -> str:
    buffer = io.BytesIO()
    Image.fromarray(_picture()).save(buffer, format="GIF")
    return base64.b64encode(buffer.getvalue()).decode()


def _bomb(side: int = 30000) -> str:
    """A side x side 1-bit PNG of zeros: ~110 KB that would decode to 900 million pixels."""
    row = b"\x00" * (1 + (side + 7) // 8)
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
           + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode()


def _events(response: requests.Response):
    """(event, data) pairs of a Server-Sent Events response, as they arrive."""
    kind = None
    for line in response.iter_lines():
        if line.startswith(b"event: "):
            kind = line[7:].decode()
        elif line.startswith(b"data: "):
            yield kind, json.loads(line[6:])


def test_health_model_page_and_openapi(service, tiny_model):
    assert requests.get(f"{service}/healthz").json() == {"status": "ok"}
    from psunet.text import TextCodec, load_vectors

    info = requests.get(f"{service}/v1/model").json()
    assert info["vocabulary_size"] == len(TextCodec(load_vectors(tiny_model / "word_vectors/words.bin"), 16).vocab)
    assert info["resolution"] == 32 and info["parameters"] > 1000
    assert info["training_step"] == json.loads((tiny_model / "training.json").read_text())["step"]
    assert info["model_config"]["text_len"] == 16 and info["limits"]["max_samples"] == 4
    assert info["precision"] == "fp32" and info["threads"] == 1  # num_cpus 1: one torch thread
    assert info["defaults"] == {"steps": 35, "scheduler": "dpmsolver++", "spacing": "trailing",
                                "guidance_scale_image": 3.0, "guidance_scale_text": 2.0,
                                "guidance_interval": [0.0, 1.0], "clamp_text": False, "text_eta": 1.0,
                                "seed": 0}
    trained = DiffusionConfig.saved(info["diffusion_config"])
    assert info["schedulers"] == list(schedulers_for(trained)) and "dpmsolver++" in info["schedulers"]
    other = next(name for name in SCHEDULERS if name not in info["schedulers"])  # euler (flow) or ddim (DDPM)
    refused = requests.post(f"{service}/v1/text-to-image", json={"prompt": PROMPT, "scheduler": other}, timeout=60)
    assert refused.status_code == 422, refused.text
    assert f"scheduler: {other!r}" in refused.json()["error"]
    assert f"choose one of {', '.join(info['schedulers'])}" in refused.json()["error"]
    paths = requests.get(f"{service}/openapi.json").json()["paths"]
    assert {"/v1/text-to-image", "/v1/image-to-text", "/v1/generate", "/v1/infill", "/healthz", "/v1/model"} <= set(paths)
    page = requests.get(f"{service}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text and "https://" not in page.text  # the page makes no external requests


def test_text_to_image_json_and_png(service):
    answer = requests.post(f"{service}/v1/text-to-image", json={"prompt": PROMPT, "num_samples": 2, "steps": 3,
                                                                 "seed": 5}).json()
    images = [_image(data) for data in answer["images"]]
    assert [image.shape for image in images] == [(32, 32, 3)] * 2
    assert answer["captions"] == [PROMPT, PROMPT] and answer["seeds"] == [5, 6] and answer["unknown_words"] == []
    assert answer["network_evaluations_per_sample"] == 6  # guided: 2 evaluations x 3 steps
    assert not np.array_equal(images[0], images[1])
    again = requests.post(f"{service}/v1/text-to-image", json={"prompt": PROMPT, "steps": 3, "seed": 5}).json()
    assert np.abs(_image(again["images"][0]).astype(int) - images[0]).max() <= 2  # same seed, same image
    png = requests.post(f"{service}/v1/text-to-image", json={"prompt": PROMPT, "steps": 3, "response_format": "png"})
    assert png.headers["content-type"] == "image/png" and png.headers["x-caption"] == PROMPT
    assert Image.open(io.BytesIO(png.content)).size == (32, 32)


def test_image_to_text_generate_and_infill(service, tiny_model):
    from psunet.text import load_vectors

    vocabulary = set(load_vectors(tiny_model / "word_vectors/words.bin").key_to_index)
    picture = _picture()
    answer = requests.post(f"{service}/v1/image-to-text", json={"image": _png(picture), "steps": 3,
                                                                 "num_samples": 2}).json()
    assert len(answer["captions"]) == 2 and "images" not in answer
    assert all(set(caption.split()) <= vocabulary for caption in answer["captions"])
    assert answer["clamp_text"] is False
    clamped = requests.post(f"{service}/v1/image-to-text", json={"image": _png(picture), "steps": 3,
                                                                  "clamp_text": True}).json()
    assert clamped["clamp_text"] is True and set(clamped["captions"][0].split()) <= vocabulary
    assert answer["text_eta"] == 1.0
    scheduled = requests.post(f"{service}/v1/image-to-text", json={"image": _png(picture), "steps": 3,
                                                                    "text_eta": 0.0}).json()
    assert scheduled["text_eta"] == 0.0 and set(scheduled["captions"][0].split()) <= vocabulary
    assert answer["guidance_interval"] == [0.0, 1.0]
    interval = requests.post(f"{service}/v1/image-to-text", json={"image": _png(picture), "steps": 3,
                                                                   "guidance_interval": [0.2, 0.8]}).json()
    assert interval["guidance_interval"] == [0.2, 0.8]
    refused = requests.post(f"{service}/v1/image-to-text",
                            json={"image": _png(picture), "guidance_interval": [0.8, 0.2]})
    assert refused.status_code == 422 and "guidance_interval" in refused.json()["error"]

    generated = requests.post(f"{service}/v1/generate", json={"num_samples": 3, "steps": 2}).json()
    assert len(generated["images"]) == 3 and len(generated["captions"]) == 3
    assert generated["network_evaluations_per_sample"] == 2  # nothing known: no guidance pass

    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, :16] = 255  # generate the left half
    filled = requests.post(f"{service}/v1/infill", json={
        "prompt": "a [?] circle on the [?]", "image": _png(picture), "mask": _png(np.repeat(mask[..., None], 3, 2)),
        "steps": 3}).json()
    image = _image(filled["images"][0])
    assert np.array_equal(image[:, 16:], picture[:, 16:])  # known pixels come back exactly
    # the known words stay where they were; a blank the tiny model fills with the end token reads as no word
    caption = filled["captions"][0]
    assert re.fullmatch(r"a (\w+ )?circle on the( \w+)*", caption) and set(caption.split()) <= vocabulary, caption
    resized = requests.post(f"{service}/v1/infill", json={"image": _png(_picture(64)), "resize": True, "steps": 2})
    assert resized.status_code == 200 and _image(resized.json()["images"][0]).shape == (32, 32, 3)


def test_paint_with_words_moves_the_image_and_only_for_the_painted_request(service):
    base = {"prompt": PROMPT, "steps": 3, "seed": 11}
    plain = requests.post(f"{service}/v1/text-to-image", json=base).json()
    right = {"word": "red", "box": [16, 0, 32, 32]}
    painted = requests.post(f"{service}/v1/text-to-image", json={**base, "paint": [right], "paint_weight": 8}).json()
    mask = np.zeros((32, 32, 3), np.uint8)
    mask[:, 16:] = 255
    by_mask = requests.post(f"{service}/v1/text-to-image", json={
        **base, "paint": [{"word": 2, "mask": _png(mask)}], "paint_weight": 8}).json()
    assert painted["captions"] == [PROMPT]
    assert np.abs(_image(painted["images"][0]).astype(int) - _image(plain["images"][0])).max() > 2
    assert np.abs(_image(painted["images"][0]).astype(int) - _image(by_mask["images"][0])).max() <= 2
    infilled = requests.post(f"{service}/v1/infill", json={"prompt": "a small red [?] on the left", "steps": 3,
                                                           "paint": [right]})
    assert infilled.status_code == 200 and len(infilled.json()["images"]) == 1


def _bad_image_pair() -> dict:
    return {"image": _png(_picture()), "mask": _png(np.zeros((16, 16, 3), np.uint8))}


BAD_REQUESTS = [
    # (path, body: dict | raw str, status, words the error names)
    ("/v1/text-to-image", "{not json", 400, "malformed JSON"),
    ("/v1/text-to-image", "[1, 2]", 422, "valid dictionary"),
    ("/v1/text-to-image", {}, 422, "prompt: Field required"),
    ("/v1/text-to-image", {"prompt": 7}, 422, "prompt"),
    ("/v1/text-to-image", {"prompt": ""}, 422, "prompt: empty"),
    ("/v1/text-to-image", {"prompt": "   "}, 422, "prompt: empty"),
    ("/v1/text-to-image", {"prompt": "red " * 30}, 422, "over the limit of 80"),
    ("/v1/text-to-image", {"prompt": "zebra quantum"}, 422, "no word in the model's vocabulary"),
    ("/v1/text-to-image", {"prompt": PROMPT, "steps": 0}, 422, "steps"),
    ("/v1/text-to-image", {"prompt": PROMPT, "steps": 10**6}, 422, "steps: 1000000 is over the server limit of 50"),
    ("/v1/text-to-image", {"prompt": PROMPT, "steps": "ten"}, 422, "steps"),
    ("/v1/text-to-image", {"prompt": PROMPT, "steps": 2.5}, 422, "steps"),
    ("/v1/text-to-image", '{"prompt": "a red circle", "guidance_scale": NaN}', 422, "guidance_scale: Input should be a finite number"),
    ("/v1/text-to-image", '{"prompt": "a red circle", "guidance_scale": Infinity}', 422, "guidance_scale"),
    ("/v1/text-to-image", {"prompt": PROMPT, "guidance_scale": -1}, 422, "guidance_scale"),
    ("/v1/text-to-image", {"prompt": PROMPT, "guidance_scale": 1e9}, 422, "outside [0, 100]"),
    ("/v1/text-to-image", {"prompt": PROMPT, "num_samples": 0}, 422, "num_samples"),
    ("/v1/text-to-image", {"prompt": PROMPT, "num_samples": 100}, 422, "over the server limit of 4"),
    ("/v1/text-to-image", {"prompt": PROMPT, "guidance_scale_text": -1}, 422,
     "guidance_scale_text: Input should be greater than or equal to 0"),
    ("/v1/text-to-image", '{"prompt": "a red circle", "guidance_scale_text": NaN}', 422,
     "guidance_scale_text: Input should be a finite number"),
    ("/v1/image-to-text", {"image": _png(_picture()), "guidance_scale": 2, "guidance_scale_image": 1e9}, 422,
     "guidance_scale_image: 1000000000.0 is outside [0, 100]"),
    ("/v1/text-to-image", {"prompt": PROMPT, "guidance_scale_text": "5"}, 422, "guidance_scale_text"),
    ("/v1/text-to-image", {"prompt": PROMPT, "spacing": "sideways"}, 422, "spacing: Input should be 'trailing'"),
    ("/v1/text-to-image", {"prompt": PROMPT, "scheduler": "euler-magic"}, 422,
     "scheduler: unknown scheduler 'euler-magic'"),
    ("/v1/text-to-image", {"prompt": PROMPT, "seed": -3}, 422, "seed"),
    ("/v1/text-to-image", {"prompt": PROMPT, "temperature": 2}, 422, "temperature: unknown field"),
    ("/v1/text-to-image", {"prompt": PROMPT, "num_samples": 2, "response_format": "png"}, 422, "png returns one"),
    ("/v1/image-to-text", {}, 422, "image: Field required"),
    ("/v1/image-to-text", {"image": "!!!not base64!!!"}, 422, "image: not valid base64"),
    ("/v1/image-to-text", {"image": base64.b64encode(b"GIF? no, just bytes").decode()}, 422, "not a PNG or JPEG"),
    ("/v1/image-to-text", {"image": _png(_picture(48))}, 422, "this model takes 32x32"),
    ("/v1/image-to-text", {"image": _png(np.zeros((300, 300, 3), np.uint8)), "resize": True}, 422,
     "larger than the limit of 256"),
    ("/v1/image-to-text", {"image": _bomb()}, 422, "image: too many pixels to decode safely (a decompression bomb), larger than the limit of 256"),
    ("/v1/image-to-text", {"image": _gif()}, 422, "image: a GIF image; send PNG or JPEG"),
    ("/v1/text-to-image", {"prompt": PROMPT, "preview_every": 2}, 422, "preview_every: previews come with stream"),
    ("/v1/text-to-image", {"prompt": PROMPT, "stream": True, "response_format": "png"}, 422, "png is not streamed"),
    ("/v1/text-to-image", {"prompt": PROMPT, "stream": True, "preview_every": -1}, 422, "preview_every"),
    ("/v1/text-to-image", {"prompt": "zebra quantum", "stream": True}, 422, "no word in the model's vocabulary"),
    ("/v1/infill", {}, 422, "give a prompt, an image, or both"),
    ("/v1/infill", {"prompt": PROMPT, "mask": _png(_picture())}, 422, "mask: given without an image"),
    ("/v1/infill", _bad_image_pair(), 422, "mask: 16x16 but the image is 32x32"),
    ("/v1/infill", {"image": _png(_picture()), "mask": "@@"}, 422, "mask: not valid base64"),
    ("/v1/generate", {"num_samples": "3"}, 422, "num_samples"),
    ("/v1/generate", {"steps": None, "seed": True}, 422, "seed"),
    ("/v1/text-to-image", {"prompt": "a" * 300_000}, 413, "over the limit of 200000 bytes"),
    ("/v1/text-to-image", {"prompt": PROMPT, "paint": [{"word": "blue", "box": [0, 0, 16, 16]}]}, 422,
     "the prompt has no word 'blue'"),
    ("/v1/text-to-image", {"prompt": PROMPT, "paint": [{"word": 9, "box": [0, 0, 16, 16]}]}, 422,
     "word index 9 is outside the caption"),
    ("/v1/text-to-image", {"prompt": PROMPT, "paint": [{"word": 2, "box": [0, 0, 40, 16]}]}, 422,
     "paint.0.box: box [0, 0, 40, 16] must lie inside the 32x32 image"),
    ("/v1/text-to-image", {"prompt": PROMPT, "paint": [{"word": 2, "box": [0, 0, 16]}]}, 422, "paint.0.box"),
    ("/v1/text-to-image", {"prompt": PROMPT, "paint": [{"word": 2, "mask": _png(_picture(16))}]}, 422,
     "paint.0.mask: 16x16, but this model takes 32x32"),
    ("/v1/text-to-image", {"prompt": PROMPT, "paint": [{"word": 2}]}, 422, "give a box or a mask"),
    ("/v1/text-to-image", {"prompt": PROMPT, "paint": []}, 422, "paint: empty list"),
    ("/v1/text-to-image", {"prompt": PROMPT, "paint": [{"word": 2, "box": [0, 0, 8, 8]}], "paint_weight": -1}, 422,
     "paint_weight"),
    ("/v1/text-to-image", {"prompt": PROMPT, "paint": [{"word": 2, "box": [0, 0, 8, 8]}], "paint_fraction": 0}, 422,
     "paint_fraction"),
    ("/v1/infill", {"image": _png(_picture()), "paint": [{"word": 0, "box": [0, 0, 8, 8]}]}, 422,
     "paint: needs a prompt"),
]


@pytest.mark.parametrize("path,body,status,words", BAD_REQUESTS,
                         ids=[f"{i}-{case[3][:30]}" for i, case in enumerate(BAD_REQUESTS)])
def test_bad_request_gets_a_4xx_with_the_reason_and_the_service_stays_healthy(service, path, body, status, words):
    data = body if isinstance(body, str) else json.dumps(body)
    response = requests.post(service + path, data=data, headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == status, response.text
    assert words in response.json()["error"], response.json()
    assert requests.get(f"{service}/healthz", timeout=10).status_code == 200


def test_a_refused_scale_names_the_request_field_it_came_from(service):
    def refusal(body: dict) -> dict:
        response = requests.post(f"{service}/v1/text-to-image", json={"prompt": PROMPT, **body})
        assert response.status_code == 422, response.text
        return response.json()

    assert refusal({"guidance_scale_text": -1})["fields"] == ["guidance_scale_text"]
    shared = refusal({"guidance_scale": -1})  # both scales come from it: one problem, named once
    assert shared["fields"] == ["guidance_scale"] and shared["error"].count("guidance_scale") == 1
    assert refusal({"guidance_scale": -1, "guidance_scale_image": 2})["fields"] == ["guidance_scale"]  # the text's
    assert refusal({"steps": 0, "spacing": "x"})["fields"] == ["steps", "spacing"]
    assert refusal({"clamp_text": "yes"})["fields"] == ["clamp_text"]
    assert refusal({"text_eta": 1.5})["fields"] == ["text_eta"]


def test_guidance_per_modality_is_echoed_and_steers_its_own_modality(service):
    base = {"prompt": PROMPT, "steps": 3, "seed": 7}
    bodies = [{**base, "guidance_scale_image": 1, "guidance_scale_text": 5},
              {**base, "guidance_scale": 1},
              {**base, "guidance_scale_image": 5},
              {**base, "guidance_scale": 4, "guidance_scale_image": 1},
              base]
    with ThreadPoolExecutor(len(bodies)) as pool:  # together: one run, a scale pair per row
        split, one, strong, mixed, default = pool.map(
            lambda body: requests.post(f"{service}/v1/text-to-image", json=body, timeout=300).json(), bodies)

    def scales(answer: dict) -> tuple:
        return answer["guidance_scale_image"], answer["guidance_scale_text"], answer["guidance_scale"]

    assert scales(split) == (1.0, 5.0, None) and split["spacing"] == "trailing"
    assert scales(one) == (1.0, 1.0, 1.0)
    assert scales(strong) == (5.0, 2.0, None)  # the text keeps the server's default of its own
    assert scales(mixed) == (1.0, 4.0, None)  # a per-modality scale beats guidance_scale
    assert scales(default) == (3.0, 2.0, None)
    # text-to-image: the caption is given, so only the image's scale moves the image
    assert np.abs(_image(split["images"][0]).astype(int) - _image(one["images"][0])).max() <= 2
    assert np.abs(_image(strong["images"][0]).astype(int) - _image(one["images"][0])).max() > 2


def test_wrong_method_and_path(service):
    assert requests.get(f"{service}/v1/text-to-image").status_code == 405
    assert requests.get(f"{service}/v1/nothing-here").status_code == 404


def test_concurrent_requests_share_forwards_each_at_its_own_step(service):
    before = requests.get(f"{service}/v1/stats").json()

    def call(i: int) -> tuple[dict, int]:
        steps = 2 if i % 4 else 3  # runs of different lengths, in the same forwards
        body = {"prompt": PROMPT, "steps": steps, "seed": i}
        if i % 8 == 1:
            body["guidance_scale"] = 1.0  # a guidance scale per row inside a shared run
        return requests.post(f"{service}/v1/text-to-image", json=body, timeout=300).json(), steps

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, range(64)))
    assert all(len(answer["images"]) == 1 for answer, _ in answers)
    assert [answer["seeds"] for answer, _ in answers] == [[i] for i in range(64)]
    # guided: two passes a step; a request at guidance 1 runs one pass unless it shares a run with guided ones
    assert all(answer["steps"] == steps and answer["network_evaluations_per_sample"] == 2 * steps
               for i, (answer, steps) in enumerate(answers) if i % 8 != 1)
    assert all(answer["network_evaluations_per_sample"] in (steps, 2 * steps)
               for i, (answer, steps) in enumerate(answers) if i % 8 == 1)
    after = requests.get(f"{service}/v1/stats").json()
    request_steps = sum(steps for _, steps in answers)
    assert after["request_forwards"] - before["request_forwards"] == request_steps  # each step in one forward
    assert after["forwards"] - before["forwards"] < request_steps / 2  # far fewer than one per request step
    assert after["largest_forward_requests"] > 1 and after["waiting"] == 0

    # a sample does not depend on its batch mates: request 5 alone gives the image it got in the crowd
    alone = requests.post(f"{service}/v1/text-to-image", json={"prompt": PROMPT, "steps": 2, "seed": 5}).json()
    crowd = answers[5][0]
    assert np.abs(_image(alone["images"][0]).astype(int) - _image(crowd["images"][0])).max() <= 2


def test_serve_config_in_cluster_is_valid_and_bad_arguments_name_the_field():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(Path("cluster/serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    application = schema.applications[0]
    assert application.import_path == "jobs.serve:app" and schema.http_options.host == "127.0.0.1"
    ServeArgs.model_validate(application.args)
    from psunet.settings import SamplerSettings

    assert ServeArgs(model="m").defaults == SamplerSettings()
    older = ServeArgs(model="m", default_steps="10", default_guidance_scale=2, default_scheduler="ddim")  # flat form
    assert older.defaults == SamplerSettings(steps=10, guidance_scale=2, scheduler="ddim")
    assert ServeArgs.model_validate(json.loads(older.model_dump_json())) == older  # as the replicas get it
    with pytest.raises(ValueError, match="guidance_scale_text"):
        app({"model": "m", "default_guidance_scale_text": -1})
    with pytest.raises(ValueError, match="unknown scheduler"):
        app({"model": "m", "defaults": {"scheduler": "euler-magic"}})
    assert {d["name"] for d in config["applications"][0]["deployments"]} == {"Sampler", "Ingress"}
    with pytest.raises(ValueError, match="max_samples"):
        app({"model": "m", "max_samples": 0})
    with pytest.raises(ValueError, match="precision"):
        app({"model": "m", "precision": "fp16"})
    with pytest.raises(ValueError, match="model"):
        app({})


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Debian's chromium is needed for the browser test (`make test` installs it)")
    return path


SCREENSHOTS = Path("runs/screenshots")  # written by the browser test for people to look at; not committed

# The test's own record of the page's state over time: every value the progress bar took and every image shown.
WATCH_PAGE = """() => {
  window.seen = { progress: [], images: [] };
  new MutationObserver(() => {
    const value = Number(document.getElementById('progress').value);
    if (window.seen.progress.at(-1) !== value) window.seen.progress.push(value);
  }).observe(document.getElementById('progress'), { attributes: true });
  new MutationObserver(() => window.seen.images.push(document.getElementById('result').src))
    .observe(document.getElementById('result'), { attributes: true, attributeFilter: ['src'] });
}"""


def test_web_page_in_headless_chromium(long_runs):
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), headless=True,
                                             args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page()
        outside = []
        page.on("request", lambda request: None if request.url.startswith(("http://127.0.0.1", "data:", "blob:"))
                else outside.append(request.url))
        page.goto(long_runs + "/")
        page.wait_for_function("document.getElementById('steps').value !== ''")
        assert page.input_value("#guidance-image") == "3" and page.input_value("#guidance-text") == "2"
        assert page.eval_on_selector_all("#scheduler option", "options => options.map(o => o.value)") == \
            ["dpmsolver++", "ddim", "ddpm"]
        page.fill("#prompt", PROMPT)
        page.fill("#steps", "30")
        page.select_option("#scheduler", "ddim")
        page.fill("#preview-every", "5")
        page.fill("#guidance-image", "1.5")
        assert page.inner_text("#guidance-image-value") == "1.5"

        page.check("input[name=tool][value=box]")  # paint "red" into the right half: a drag on the canvas
        page.fill("#paint-word", "red")
        canvas = page.locator("#boxes").bounding_box()
        page.mouse.move(canvas["x"] + canvas["width"] / 2, canvas["y"] + 2)
        page.mouse.down()
        page.mouse.move(canvas["x"] + canvas["width"] - 2, canvas["y"] + canvas["height"] / 2, steps=5)
        page.mouse.up()
        assert page.inner_text("#regions li").startswith("red: [16, 0, 32, 16]")

        page.evaluate(WATCH_PAGE)
        with page.expect_request("**/long/v1/text-to-image") as sent:
            page.click("#generate")
        body = sent.value.post_data_json
        assert (body["guidance_scale_image"], body["guidance_scale_text"]) == (1.5, 2)
        assert body["stream"] is True and body["preview_every"] == 5 and body["steps"] == 30
        assert body["scheduler"] == "ddim" and body["paint"] == [{"word": "red", "box": [16, 0, 32, 16]}]
        page.wait_for_function("document.getElementById('status').textContent.startsWith('done')",
                               timeout=120_000)
        seen = page.evaluate("window.seen")
        assert seen["progress"] == sorted(seen["progress"]) and seen["progress"][-1] == 30
        assert len(seen["progress"]) > 5  # the bar moved step by step
        assert len(seen["images"]) == 6  # previews at steps 5, 10, ..., 25, then the result
        assert page.eval_on_selector("#result", "img => img.naturalWidth") == 32
        assert page.inner_text("#caption") == PROMPT and page.inner_text("#error") == ""
        assert page.locator("#gallery figure").count() == 1
        assert PROMPT in page.inner_text("#gallery figcaption")
        page.screenshot(path=str(SCREENSHOTS / "page-generated.png"), full_page=True)

        page.fill("#steps", "1000")  # a long run, cancelled once it is under way
        page.evaluate(WATCH_PAGE)
        page.click("#generate")
        page.wait_for_function("window.seen.progress.at(-1) >= 2", timeout=60_000)
        page.click("#cancel")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('cancelled')")
        status = page.inner_text("#status")
        step = int(status.split()[3])
        assert status == f"cancelled at step {step} of 1000" and 2 <= step < 1000
        assert page.is_enabled("#generate") and page.is_disabled("#cancel") and page.inner_text("#error") == ""
        assert page.locator("#gallery figure").count() == 1  # a cancelled run adds nothing
        page.screenshot(path=str(SCREENSHOTS / "page-cancelled.png"), full_page=True)
        stats = requests.get(f"{long_runs}/v1/stats").json()
        assert stats["cancelled"] == 1
        assert stats["request_forwards"] < 30 + 1000  # the cancelled run stopped early

        upload = SCREENSHOTS / "upload.png"  # inpainting: an uploaded image, its left half painted over
        upload.write_bytes(base64.b64decode(_png(_picture(64))))
        page.set_input_files("#upload", str(upload))
        page.check("input[name=tool][value=mask]")
        page.fill("#steps", "3")
        page.mouse.move(canvas["x"] + 20, canvas["y"] + 20)
        page.mouse.down()
        page.mouse.move(canvas["x"] + 20, canvas["y"] + canvas["height"] - 20, steps=8)
        page.mouse.up()
        with page.expect_request("**/long/v1/infill") as sent:
            page.click("#generate")
        body = sent.value.post_data_json
        assert body["image"].startswith("data:image/png;base64,") and body["mask"].startswith("data:image/png")
        assert body["prompt"] == PROMPT
        page.wait_for_function("document.getElementById('status').textContent.startsWith('done')")
        assert page.locator("#gallery figure").count() == 2 and "infill" in page.inner_text("#gallery figcaption")

        page.fill("#steps", "0")  # the server's refusal is shown, the page keeps working
        page.click("#generate")
        page.wait_for_function("document.getElementById('error').textContent !== ''")
        assert "steps" in page.inner_text("#error")
        browser.close()
    assert outside == []


def test_a_request_over_the_time_limit_gets_504_and_the_service_stays_healthy(service, tiny_model):
    from ray import serve

    serve.run(app({"model": str(tiny_model), "request_timeout_s": 0.01, "batch_wait_timeout_s": 0.2,
                  "num_cpus": 0.5}),
              name="hurried", route_prefix="/hurried")
    try:
        response = requests.post(f"{service}/hurried/v1/text-to-image", json={"prompt": PROMPT, "steps": 40})
        assert response.status_code == 504 and "timed out after 0.01 s" in response.json()["error"]
        streamed = requests.post(f"{service}/hurried/v1/text-to-image", json={"prompt": PROMPT, "steps": 40,
                                                                              "stream": True})
        assert streamed.status_code == 504 or list(_events(streamed))[-1][1]["status"] == 504
        assert requests.get(f"{service}/hurried/healthz").status_code == 200
    finally:
        serve.delete("hurried")
    assert requests.post(f"{service}/v1/text-to-image", json={"prompt": PROMPT, "steps": 2}).status_code == 200


def test_past_its_bound_the_service_answers_503_with_retry_after_at_once_and_stays_healthy(service, tiny_model):
    from ray import serve

    serve.run(app({"model": str(tiny_model), "max_pending_requests": 2, "retry_after_s": 3, "max_steps": 1000,
                   "request_timeout_s": 60, "num_cpus": 0.5}),
              name="busy", route_prefix="/busy")
    try:
        def call(seed: int) -> tuple[int, str | None, dict, float]:
            start = time.monotonic()
            response = requests.post(f"{service}/busy/v1/text-to-image",
                                     json={"prompt": PROMPT, "steps": 1000, "seed": seed}, timeout=120)
            return response.status_code, response.headers.get("Retry-After"), response.json(), \
                time.monotonic() - start

        with ThreadPoolExecutor(10) as pool:
            answers = list(pool.map(call, range(10)))
        done = [answer for answer in answers if answer[0] == 200]
        refused = [answer for answer in answers if answer[0] == 503]
        assert len(done) + len(refused) == 10 and len(done) >= 2 and len(refused) >= 1, [a[:2] for a in answers]
        for _, retry_after, body, seconds in refused:
            assert retry_after == "3" and "limit of 2 requests" in body["error"] and seconds < 5
        assert all(seconds < 60 and len(body["images"]) == 1 for _, _, body, seconds in done)
        stats = requests.get(f"{service}/busy/v1/stats").json()
        assert stats["refused_overloaded"] == len(refused) and stats["pending"] == 0
        assert requests.get(f"{service}/busy/healthz").status_code == 200
        again = requests.post(f"{service}/busy/v1/text-to-image", json={"prompt": PROMPT, "steps": 2}, timeout=60)
        assert again.status_code == 200
    finally:
        serve.delete("busy")


def test_replica_resources_and_threads(ray_local):
    from jobs.serve import replica_resources, replica_threads

    assert replica_resources(ServeArgs(model="m")) == (2, 0)  # the test cluster: one node, 2 CPUs, no GPU
    assert replica_resources(ServeArgs(model="m", num_gpus=1)) == (1, 1)
    assert replica_resources(ServeArgs(model="m", num_cpus=0.5)) == (0.5, 0)
    # threads are decided where the replica runs: every CPU of its node unless num_cpus says otherwise
    assert replica_threads(None, "cpu") == 2 and replica_threads(1, "cpu") == 1
    assert replica_threads(None, "cuda") is None
    # `serve run` builds the application before Ray runs: 1 CPU asked for, this machine's GPUs
    code = "from jobs.serve import ServeArgs, replica_resources; print(replica_resources(ServeArgs(model='m')))"
    built = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert built.stdout.strip() == "(1, 0)"


def test_streamed_request_sends_each_step_in_order_previews_and_the_same_result(service):
    body = {"prompt": PROMPT, "steps": 6, "seed": 9, "guidance_scale_image": 4}
    plain = requests.post(f"{service}/v1/text-to-image", json=body, timeout=120).json()
    with requests.post(f"{service}/v1/text-to-image", json={**body, "stream": True, "preview_every": 2},
                       stream=True, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = list(_events(response))
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "result" and "error" not in kinds
    assert len(events[0][1]["request_id"]) == 32 and events[0][1]["steps"] == 6
    progress = [data for kind, data in events if kind == "progress"]
    assert [(data["step"], data["steps"]) for data in progress] == [(i, 6) for i in range(1, 7)]
    previews = [(i, data) for i, (kind, data) in enumerate(events) if kind == "preview"]
    assert [data["step"] for _, data in previews] == [2, 4]  # not at the last step: the result is
    for i, data in previews:
        assert events[i - 1] == ("progress", {"step": data["step"], "steps": 6})  # right after its step
        assert _image(data["images"][0]).shape == (32, 32, 3) and data["captions"] == [PROMPT]
    result = events[-1][1]
    assert result == plain  # the same JSON, images included, as the endpoint without stream
    early, late = (_image(data["images"][0]).astype(int) for _, data in previews)
    final = _image(result["images"][0]).astype(int)
    assert np.abs(late - final).mean() < np.abs(early - final).mean()  # previews converge on the result

    infill = requests.post(f"{service}/v1/image-to-text", json={"image": _png(_picture()), "steps": 3, "stream": True},
                           stream=True, timeout=120)
    kinds = [kind for kind, _ in _events(infill)]
    assert kinds == ["start", "progress", "progress", "progress", "result"]


def test_a_cancelled_request_frees_its_rows_and_leaves_its_batch_mates_unchanged(service):
    steps = 40
    before = requests.get(f"{service}/v1/stats").json()

    def streamed_then_gone() -> int:
        with requests.post(f"{service}/v1/text-to-image", json={"prompt": PROMPT, "steps": steps, "seed": 30,
                                                                "stream": True}, stream=True, timeout=120) as response:
            for kind, data in _events(response):
                if kind == "progress" and data["step"] >= 3:
                    return data["step"]  # leaving the with block closes the connection
        raise AssertionError("the stream ended before step 3")

    def plain(seed: int) -> dict:
        return requests.post(f"{service}/v1/text-to-image", json={"prompt": PROMPT, "steps": steps, "seed": seed},
                             timeout=120).json()

    with ThreadPoolExecutor(3) as pool:  # together: one run of three requests
        gone, *mates = [pool.submit(streamed_then_gone), pool.submit(plain, 31), pool.submit(plain, 32)]
        mates = [mate.result() for mate in mates]
    assert gone.result() >= 3
    after = requests.get(f"{service}/v1/stats").json()
    assert after["cancelled"] - before["cancelled"] == 1
    carried = after["request_forwards"] - before["request_forwards"]
    assert carried < 3 * steps  # the cancelled request left the forwards before its last step
    for seed, mate in zip((31, 32), mates):
        alone = plain(seed)
        assert np.abs(_image(alone["images"][0]).astype(int) - _image(mate["images"][0])).max() <= 2

    stream = requests.post(f"{service}/v1/text-to-image", json={"prompt": PROMPT, "steps": 50, "stream": True},
                           stream=True, timeout=120)
    events = _events(stream)
    request_id = next(events)[1]["request_id"]
    assert requests.post(f"{service}/v1/cancel/{request_id}").json() == {"request_id": request_id, "cancelled": True}
    assert [kind for kind, _ in events][-1] == "cancelled"
    missing = requests.post(f"{service}/v1/cancel/{request_id}")  # no longer in flight
    assert missing.status_code == 404 and request_id in missing.json()["error"]


def test_load_of_200_mixed_requests_from_16_clients_has_no_errors(service):
    def call(i: int) -> tuple[int, dict]:
        body = {"prompt": PROMPT, "seed": i, "steps": 2 + i % 4, "guidance_scale_image": float(i % 5)}
        if i % 3 == 0:
            body["guidance_scale_text"] = 1.0 + i % 2
        response = requests.post(f"{service}/v1/text-to-image", json=body, timeout=300)
        return response.status_code, response.json()

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, range(200)))
    assert [status for status, _ in answers] == [200] * 200
    assert [answer["seeds"] for _, answer in answers] == [[i] for i in range(200)]
    assert all(answer["steps"] == 2 + i % 4 and answer["guidance_scale_image"] == i % 5
               for i, (_, answer) in enumerate(answers))
    assert requests.get(f"{service}/v1/stats").json()["waiting"] == 0


def _sampler_pid(app_name: str) -> int:
    import ray

    names = [actor for actor in ray.util.list_named_actors(all_namespaces=True)
             if actor["name"].startswith(f"SERVE_REPLICA::{app_name}#Sampler#")]
    assert len(names) == 1, names
    replica = ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])
    return ray.get(replica.__ray_call__.remote(lambda self: os.getpid()))


def test_a_killed_model_replica_costs_its_requests_a_503_and_the_service_recovers(long_runs):
    pid = _sampler_pid("long")
    long = {"prompt": PROMPT, "steps": 1000}

    def plain(seed: int) -> tuple[int, dict, float]:
        start = time.monotonic()
        response = requests.post(f"{long_runs}/v1/text-to-image", json={**long, "seed": seed}, timeout=120)
        return response.status_code, response.json(), time.monotonic() - start

    with ThreadPoolExecutor(2) as pool, requests.post(f"{long_runs}/v1/text-to-image", json={**long, "stream": True},
                                                      stream=True, timeout=120) as streamed:
        in_flight = [pool.submit(plain, seed) for seed in (1, 2)]
        events = _events(streamed)
        assert next(kind for kind, _ in events if kind == "progress")  # sampling is under way
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        last = list(events)[-1]
        answers = [future.result() for future in in_flight]
    assert last[0] == "error" and last[1]["status"] == 503 and "model replica stopped" in last[1]["error"]
    for status, body, seconds in answers:
        assert status == 503 and "model replica stopped" in body["error"] and seconds < 60
    deadline = time.monotonic() + 120
    while requests.get(f"{long_runs}/healthz", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "the service did not recover within 120 s"
        time.sleep(1)
    assert _sampler_pid("long") != pid  # Serve started a new replica
    again = requests.post(f"{long_runs}/v1/text-to-image", json={"prompt": PROMPT, "steps": 3}, timeout=120)
    assert again.status_code == 200 and _image(again.json()["images"][0]).shape == (32, 32, 3)
