"""Ray Serve sampling service: a FastAPI ingress in front of a batched model deployment.

    serve run jobs.serve:app model=runs/demo/model          # http://127.0.0.1:8000/ (web page), /docs (API)
    serve run jobs.serve:app model=runs:/<run id>/model max_samples=4
    serve deploy cluster/serve.yaml                          # replicas, autoscaling, GPUs on a cluster

Endpoints: POST /v1/text-to-image, /v1/image-to-text, /v1/generate, /v1/infill (the first and the
last take paint-with-words regions for prompt words); GET /healthz,
/v1/model, /v1/stats (batching counters), / (web page). Every request becomes rows of a sampler run
(`Pipeline.start_infill`); the model deployment batches at the level of sampler steps: each forward
carries every running request, each at its own step, and a request that arrives mid-way joins at the
next step (continuous batching). Rows have their own seed and (image, text) guidance scales, so a
sample does not depend on its batch mates. Sampler settings a request leaves out come from the
service's `defaults` (SamplerSettings), and SamplerSettings checks them all.
Safety: binds 127.0.0.1 unless configured, body size limit, bounded samples/steps/image size, JSON
only (no pickle, no code from requests), a per-request timeout.
"""


import asyncio
import base64
import binascii
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve

from psunet.config import StrictModel
from psunet.diffusion import SCHEDULERS
from psunet.settings import MAX_STEPS, SamplerSettings

PAGE = Path(__file__).with_name("serve_page.html")
SETTINGS = SamplerSettings.model_fields
GUIDANCE = ("guidance_scale_image", "guidance_scale_text")
MAX_GUIDANCE = 100  # the service's bound on a guidance scale


class ServeArgs(StrictModel):
    """Application arguments (`serve run jobs.serve:app key=value` or `args:` in the Serve config)."""

    model: str = Field(description="checkpoint / model folder, or an MLflow URI such as runs:/<id>/model")
    weights: Literal["ema", "model"] = "ema"
    tracking_uri: str | None = None
    device: str | None = Field(None, description="default: cuda when the replica has a GPU, else cpu")
    num_gpus: float | None = Field(None, ge=0, description="per model replica; default: 1 if the cluster has GPUs")
    num_cpus: float | None = Field(None, ge=0, description="per model replica, also its torch threads; default: 1 "
                                                            "with a GPU, else all the CPUs of the largest node")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: GPUs and CPUs with native bf16")
    max_samples: int = Field(8, ge=1, le=256, description="most samples one request may ask for")
    max_steps: int = Field(100, ge=1, le=MAX_STEPS)
    max_prompt_chars: int = Field(300, ge=1)
    max_image_side: int = Field(2048, ge=8, description="largest uploaded image side before resizing")
    max_body_bytes: int = Field(8 << 20, ge=1024)
    request_timeout_s: float = Field(120, gt=0)
    max_batch_size: int = Field(64, ge=1, description="most samples in one forward (all running requests together)")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="when idle, how long to let a burst of requests "
                                                                 "arrive before the first step")
    defaults: SamplerSettings = Field(default_factory=SamplerSettings,
                                      description="sampler settings for requests that leave them out; "
                                                  "default_<setting>=value sets one (default_steps=10)")

    @model_validator(mode="before")
    @classmethod
    def _flat_defaults(cls, data):
        """`default_<setting>` arguments (the command line's flat form; also the older arguments default_steps,
        default_guidance_scale, default_scheduler) go into `defaults`."""
        if not isinstance(data, dict) or not any(key.startswith("default_") for key in data):
            return data
        rest = {key: value for key, value in data.items() if not key.startswith("default_")}
        flat = {key.removeprefix("default_"): value for key, value in data.items() if key.startswith("default_")}
        return {**rest, "defaults": {**dict(rest.get("defaults") or {}), **flat}}


# ---- requests -----------------------------------------------------------------------------------------------

class Options(BaseModel):
    """Sampler settings of a request; those left out are the server's defaults. SamplerSettings checks them."""

    model_config = ConfigDict(extra="forbid", strict=True)

    num_samples: int = Field(1, ge=1, description="bounded by the server's max_samples")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="sample i uses seed + i")
    steps: int | None = Field(None, description="sampler steps; bounded by the server's max_steps")
    scheduler: str | None = Field(None, description=SETTINGS["scheduler"].description)
    spacing: str | None = Field(None, description=SETTINGS["spacing"].description)
    guidance_scale: float | None = Field(None, description=f"both guidance scales (at most {MAX_GUIDANCE}), "
                                                           "unless given one by one")
    guidance_scale_image: float | None = Field(None, description=SETTINGS["guidance_scale_image"].description)
    guidance_scale_text: float | None = Field(None, description=SETTINGS["guidance_scale_text"].description)


class PaintRegion(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    word: int | str = Field(description="the prompt's word, or its index in the prompt (0 = first word)")
    box: list[int] | None = Field(None, description="[x0, y0, x1, y1] in pixels at the model's resolution")
    mask: str | None = Field(None, description="PNG base64 at the model's resolution; white = the word goes here")


class Painting(BaseModel):
    """Paint-with-words fields shared by the requests that take a prompt."""

    paint: list[PaintRegion] | None = Field(None, description="regions for prompt words (eDiff-I paint-with-words)")
    paint_weight: float = Field(1.0, ge=0, le=100, allow_inf_nan=False, description="bias strength w")
    paint_fraction: float = Field(1.0, gt=0, le=1, description="share of the steps (the noisiest) with the bias")


class TextToImage(Options, Painting):
    prompt: str = Field(description="a caption; [?] marks a word to fill in")
    response_format: Literal["json", "png"] = Field("json", description="png: the image itself (num_samples 1)")


class ImageToText(Options):
    image: str = Field(description="PNG or JPEG, base64 (a data: URL prefix is accepted)")
    resize: bool = Field(False, description="resize to the model's resolution instead of refusing another size")


class Generate(Options):
    pass


class Infill(Options, Painting):
    prompt: str | None = Field(None, description="partial caption with [?] blanks (omit: caption unknown)")
    image: str | None = Field(None, description="PNG/JPEG base64 (omit: image unknown)")
    mask: str | None = Field(None, description="PNG base64 the image's size; white = generate, black = keep")
    resize: bool = False


class RequestError(ValueError):
    """A request the service refuses; `status` is the HTTP code, `fields` (when known) the fields at fault."""

    def __init__(self, message: str, status: int = 422, fields: list[str] | None = None):
        super().__init__(message)
        self.status, self.fields = status, fields

    @classmethod
    def naming(cls, problems: list[tuple[str, str]]) -> "RequestError":
        """A 422 from (field, problem) pairs, each said once: "field: problem; ..."."""
        problems = list(dict.fromkeys(problems))
        return cls("; ".join(f"{field}: {problem}" for field, problem in problems),
                   fields=list(dict.fromkeys(field for field, _ in problems)))

    def response(self) -> JSONResponse:
        body = {"error": str(self)} if self.fields is None else {"error": str(self), "fields": self.fields}
        return JSONResponse(body, status_code=self.status)


def _problems(errors: list[dict], names: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(field, problem) for pydantic errors: the dotted location ("body" for the whole body), renamed by `names`."""
    pairs = []
    for error in errors:
        where = ".".join(str(part) for part in error["loc"] if part != "body") or "body"
        problem = "unknown field" if error["type"] == "extra_forbidden" else error["msg"].removeprefix("Value error, ")
        pairs.append(((names or {}).get(where, where), problem))
    return pairs


@dataclass
class Job:
    """One request as rows of a sampler run. The group key says which requests may start as one run."""

    rows: int
    settings: SamplerSettings  # the request's, checked; row i uses seed + i and the request's guidance
    prompts: list[str] | None = None
    images: np.ndarray | None = None  # (rows, H, W, 3) uint8 at the model's resolution
    masks: np.ndarray | None = None  # (rows, H, W) bool, True = generate
    paint: list | None = None  # per row: [(word, (H, W) bool region), ...]
    paint_weight: float = 1.0
    paint_fraction: float = 1.0

    @property
    def seeds(self) -> list[int]:
        return [self.settings.seed + i for i in range(self.rows)]

    @property
    def guidance_scales(self) -> list[tuple[float, float]]:
        """(image, text) guidance scales, one pair per row."""
        return [self.settings.guidance] * self.rows

    @property
    def group(self) -> tuple:
        painting = (self.paint_weight, self.paint_fraction) if self.paint is not None else None
        run = self.settings
        return (run.steps, run.scheduler, run.spacing, self.prompts is not None, self.images is not None,
                self.masks is not None, painting)


def decode_image(data: str, field: str, max_side: int) -> Image.Image:
    """base64 (optionally a data: URL) -> PIL image; a clear RequestError for anything else."""
    if not isinstance(data, str) or not data.strip():
        raise RequestError(f"{field}: empty")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{field}: not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw))
        image.verify()
        image = Image.open(io.BytesIO(raw))
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise RequestError(f"{field}: the bytes are not a PNG or JPEG image") from None
    if max(image.size) > max_side:
        raise RequestError(f"{field}: {image.size[0]}x{image.size[1]} is larger than the limit of {max_side} px a side")
    try:
        image.load()
    except (OSError, SyntaxError):
        raise RequestError(f"{field}: the image data is truncated or corrupt") from None
    return image


def mask_pixels(picture: Image.Image, size: int) -> np.ndarray:
    """A mask image as (size, size) bool at the model's resolution: white (> 127) is True."""
    return np.asarray(picture.convert("L").resize((size, size), Image.NEAREST)) > 127


def _error(message: str, status: int = 422) -> JSONResponse:
    return RequestError(message, status).response()


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


# ---- model deployment --------------------------------------------------------------------------------------

@serve.deployment(max_ongoing_requests=128)
class Sampler:
    """Holds the Pipeline and samples every job under way together, one sampler step at a time.

    Step-level (continuous) batching: each forward carries every running job, each at its own step;
    a job that arrives while others run joins at their next step, and leaves as soon as its last
    step is done. Jobs that arrive together and share what a run must share (steps, scheduler, spacing,
    which inputs are given, paint settings) start as one run; a run has a seed and (image, text) guidance
    scales per row, so a sample does not depend on its batch mates.
    """

    def __init__(self, args: dict):
        import torch

        from jobs.model_ref import load_pipeline

        self.args = ServeArgs.model_validate(args)
        device = self.args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pipe = load_pipeline(self.args.model, weights=self.args.weights, device=device,
                                  tracking_uri=self.args.tracking_uri, precision=self.args.precision)
        self.waiting: list[tuple[Job, asyncio.Future]] = []
        self.arrived = asyncio.Event()
        self.worker: asyncio.Task | None = None
        self.forwards = self.request_forwards = 0
        self.requests_per_forward: Counter[int] = Counter()
        self.samples_per_forward: Counter[int] = Counter()

    def describe(self) -> dict:
        import torch

        pipe = self.pipe
        return {"model_config": pipe.model_config.model_dump(mode="json"),
                "diffusion_config": pipe.diffusion_config.model_dump(mode="json"),
                "parameters": sum(p.numel() for p in pipe.model.parameters()),
                "vocabulary_size": len(pipe.codec.vocab), "training_step": pipe.training_step,
                "resolution": pipe.resolution, "device": str(pipe.device), "precision": pipe.precision,
                "threads": torch.get_num_threads(),
                "experts": [list(pair) for pair in getattr(pipe.model, "intervals", [])] or None}

    def stats(self) -> dict:
        return {"forwards": self.forwards, "request_forwards": self.request_forwards,
                "requests_per_forward": dict(self.requests_per_forward),
                "samples_per_forward": dict(self.samples_per_forward),
                "largest_forward_requests": max(self.requests_per_forward, default=0), "waiting": len(self.waiting)}

    async def run(self, job: Job) -> dict:
        """The job's output, or {"error": reason} when the model cannot take it."""
        try:
            if job.prompts is not None:
                self.pipe.check_prompts(job.prompts[:1])
        except ValueError as exc:
            return {"error": "prompt: " + str(exc).removeprefix("prompt 0 ")}
        try:
            if job.paint is not None:
                self.pipe.paint_regions(job.prompts[:1], job.paint[:1], job.paint_weight, job.paint_fraction)
        except ValueError as exc:
            return {"error": str(exc).replace("prompt 0", "the prompt")}
        answer = asyncio.get_running_loop().create_future()
        self.waiting.append((job, answer))
        self.arrived.set()
        if self.worker is None or self.worker.done():
            self.worker = asyncio.get_running_loop().create_task(self._sample())
        return await answer  # cancelled with the request (timeout): the job leaves at the next step

    async def _sample(self) -> None:
        """The step loop: admit waiting jobs, one forward for all running ones, answer those done."""
        running: list[tuple[list[tuple[Job, asyncio.Future]], object]] = []  # (members, PendingInfill)
        while True:
            if not running:
                if not self.waiting:
                    self.arrived.clear()
                    await self.arrived.wait()
                await asyncio.sleep(self.args.batch_wait_timeout_s)  # idle: let a burst arrive together
            running = [(members, pending) for members, pending in running
                       if not all(answer.done() for _, answer in members)]  # every request gone: drop the run
            running += await self._admit(sum(job.rows for members, _ in running for job, _ in members))
            if not running:
                continue
            try:
                await asyncio.to_thread(self.pipe.step, [pending.run for _, pending in running])
            except Exception as exc:  # answer every request of this forward; keep serving the next ones
                for members, _ in running:
                    _answer(members, exc)
                running = []
                continue
            requests = sum(len(members) for members, _ in running)
            self.forwards += 1
            self.requests_per_forward[requests] += 1
            self.request_forwards += requests
            self.samples_per_forward[sum(pending.run.batch_size for _, pending in running)] += 1
            for members, pending in [entry for entry in running if entry[1].run.done]:
                try:
                    result = await asyncio.to_thread(self.pipe.finish_infill, pending)
                except Exception as exc:
                    _answer(members, exc)
                    continue
                start = 0
                for job, answer in members:
                    rows = slice(start, start + job.rows)
                    start += job.rows
                    _answer([(job, answer)], {"images": result.images[rows], "captions": result.captions[rows],
                                              "unknown_words": result.unknown_words[rows],
                                              "network_evaluations": result.network_evaluations})
            running = [entry for entry in running if not entry[1].run.done]

    async def _admit(self, running_samples: int) -> list:
        """Start waiting jobs while the forward has room (max_batch_size samples; one job always fits)."""
        admitted: list[tuple[Job, asyncio.Future]] = []
        while self.waiting and (running_samples == 0 or
                                running_samples + self.waiting[0][0].rows <= self.args.max_batch_size):
            job, answer = self.waiting.pop(0)
            if not answer.done():
                admitted.append((job, answer))
                running_samples += job.rows
        groups: dict[tuple, list[tuple[Job, asyncio.Future]]] = {}
        for entry in admitted:
            groups.setdefault(entry[0].group, []).append(entry)
        started = []
        for members in groups.values():
            try:
                started.append((members, await asyncio.to_thread(self._start, [job for job, _ in members])))
            except ValueError as exc:  # the sampler refused these inputs: answer each request, keep serving
                _answer(members, {"error": str(exc)})
            except Exception as exc:
                _answer(members, exc)
        return started

    def _start(self, jobs: list[Job]):
        """One sampler run (Pipeline.start_infill) for jobs that share steps, scheduler, spacing and which inputs they
        give; each row keeps its own seed and guidance scales."""
        first = jobs[0]
        concat = (lambda name: None if getattr(first, name) is None else
                  np.concatenate([getattr(j, name) for j in jobs]))
        return self.pipe.start_infill(
            prompts=None if first.prompts is None else [p for j in jobs for p in j.prompts],
            images=concat("images"), image_masks=concat("masks"),
            count=sum(j.rows for j in jobs) if first.prompts is None and first.images is None else None,
            settings=first.settings,
            seeds=[s for j in jobs for s in j.seeds], guidance_scales=[g for j in jobs for g in j.guidance_scales],
            paint=None if first.paint is None else [p for j in jobs for p in j.paint],
            paint_weight=first.paint_weight, paint_fraction=first.paint_fraction)


def _answer(members: list, outcome) -> None:
    """Resolve each member's future with `outcome` (an exception or a result) unless it is gone."""
    for _, answer in members:
        if not answer.done():
            if isinstance(outcome, BaseException):
                answer.set_exception(outcome)
            else:
                answer.set_result(outcome)


# ---- ingress -----------------------------------------------------------------------------------------------

api = FastAPI(title="psunet sampling service", version="1",
              description="Joint text+image diffusion (PS-U-Net): text->image, image->text, generation, infilling.")


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    for error in exc.errors():
        if error["type"] == "json_invalid":
            return _error(f"malformed JSON: {error.get('ctx', {}).get('error', error['msg'])}", 400)
    return RequestError.naming(_problems(exc.errors())).response()


class BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes (by Content-Length, or while reading a chunked body).

    `limit` is per process: the Ingress replica sets it from its arguments before serving.
    """

    limit = ServeArgs.model_fields["max_body_bytes"].default

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_large = JSONResponse({"error": f"request body over the limit of {self.limit} bytes"}, status_code=413)
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_large(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise RequestError("body too large", status=413)
            return message

        try:
            await self.app(scope, limited_receive, send)
        except RequestError as exc:
            if exc.status != 413:
                raise
            await too_large(scope, receive, send)


api.add_middleware(BodyLimit)


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    """HTTP: parses and bounds requests, turns them into Jobs, awaits the Sampler, encodes the answers."""

    def __init__(self, sampler, args: dict):
        self.sampler = sampler
        self.args = ServeArgs.model_validate(args)
        self._model: dict | None = None
        BodyLimit.limit = self.args.max_body_bytes

    async def model_info(self) -> dict:
        if self._model is None:
            self._model = await self.sampler.describe.remote()
        return self._model

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/model")
    async def model(self) -> dict:
        info = await self.model_info()
        limits = {k: getattr(self.args, k) for k in ("max_samples", "max_steps", "max_prompt_chars",
                                                       "max_image_side", "max_body_bytes", "request_timeout_s")}
        return {**info, "limits": limits, "defaults": self.args.defaults.model_dump(), "schedulers": list(SCHEDULERS)}

    @api.get("/v1/stats")
    async def stats(self) -> dict:
        return await self.sampler.stats.remote()

    @api.post("/v1/text-to-image")
    async def text_to_image(self, body: TextToImage):
        if body.response_format == "png" and body.num_samples != 1:
            return _error("response_format: png returns one image; use json for num_samples > 1")
        answer = await self._serve(body, prompt=body.prompt, paint=body)
        if isinstance(answer, Response):
            return answer
        if body.response_format == "png":
            return Response(base64.b64decode(answer["images"][0]), media_type="image/png",
                            headers={"X-Caption": answer["captions"][0]})
        return answer

    @api.post("/v1/image-to-text")
    async def image_to_text(self, body: ImageToText):
        return await self._serve(body, image=body.image, resize=body.resize, keep=("captions",))

    @api.post("/v1/generate")
    async def generate(self, body: Generate):
        return await self._serve(body)

    @api.post("/v1/infill")
    async def infill(self, body: Infill):
        if body.prompt is None and body.image is None:
            return _error("give a prompt, an image, or both (use /v1/generate for neither)")
        if body.mask is not None and body.image is None:
            return _error("mask: given without an image")
        return await self._serve(body, prompt=body.prompt, image=body.image, mask=body.mask, resize=body.resize,
                                 paint=body)

    async def _serve(self, body: Options, prompt: str | None = None, image: str | None = None,
                     mask: str | None = None, resize: bool = False, keep: tuple[str, ...] = ("images", "captions"),
                     paint: Painting | None = None):
        try:
            job = await self._job(body, prompt, image, mask, resize)
            if paint is not None and paint.paint is not None:
                await self._add_paint(job, paint, resize)
        except RequestError as exc:
            return exc.response()
        response = self.sampler.run.remote(job)
        try:
            output = await asyncio.wait_for(response, self.args.request_timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            return _error(f"timed out after {self.args.request_timeout_s:g} s", 504)
        if "error" in output:
            return _error(output["error"])
        run = job.settings
        image_scale, text_scale = run.guidance
        answer = {"captions": output["captions"], "seeds": job.seeds,
                  **run.model_dump(include={"steps", "scheduler", "spacing", *GUIDANCE}),
                  "guidance_scale": image_scale if image_scale == text_scale else None,  # null when they differ
                  "network_evaluations_per_sample": output["network_evaluations"]}
        if "images" in keep:
            answer["images"] = [base64.b64encode(encode_png(image)).decode() for image in output["images"]]
        if prompt is not None:
            answer["unknown_words"] = output["unknown_words"][0]
        return answer

    async def _job(self, body: Options, prompt, image, mask, resize) -> Job:
        a = self.args
        if body.num_samples > a.max_samples:
            raise RequestError(f"num_samples: {body.num_samples} is over the server limit of {a.max_samples}")
        rows = body.num_samples
        job = Job(rows, self._settings(body))
        if prompt is not None:
            if not prompt.strip():
                raise RequestError("prompt: empty")
            if len(prompt) > a.max_prompt_chars:
                raise RequestError(f"prompt: {len(prompt)} characters, over the limit of {a.max_prompt_chars}")
            job.prompts = [prompt] * rows
        if image is not None:
            size = (await self.model_info())["resolution"]
            picture = decode_image(image, "image", a.max_image_side)
            if picture.size != (size, size) and not resize:
                raise RequestError(f"image: {picture.size[0]}x{picture.size[1]}, but this model takes {size}x{size} "
                                   "(send resize: true to resize it)")
            pixels = np.asarray(picture.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.uint8)
            job.images = np.repeat(pixels[None], rows, axis=0)
            if mask is not None:
                painted = decode_image(mask, "mask", a.max_image_side)
                if painted.size != picture.size:
                    raise RequestError(f"mask: {painted.size[0]}x{painted.size[1]} but the image is "
                                       f"{picture.size[0]}x{picture.size[1]}")
                job.masks = np.repeat(mask_pixels(painted, size)[None], rows, axis=0)
        return job

    def _settings(self, body: Options) -> SamplerSettings:
        """The request's sampler settings over the service's defaults, checked by SamplerSettings and the server's
        limits. A refusal names the request's field: guidance_scale for a scale that came from it."""
        given = body.model_dump(include={*SETTINGS, "guidance_scale"}, exclude_none=True)
        steps = given.get("steps", self.args.defaults.steps)
        if steps > self.args.max_steps:
            raise RequestError(f"steps: {steps} is over the server limit of {self.args.max_steps}")
        shared = "guidance_scale" in given
        source = {name: "guidance_scale" if shared and name not in given else name for name in GUIDANCE}
        inherited = self.args.defaults.model_dump(exclude=set(given) | (set(GUIDANCE) if shared else set()))
        try:
            settings = SamplerSettings.model_validate({**inherited, **given})
        except ValidationError as exc:
            raise RequestError.naming(_problems(exc.errors(), source)) from None
        for name in GUIDANCE:
            if getattr(settings, name) > MAX_GUIDANCE:
                raise RequestError(f"{source[name]}: {getattr(settings, name)} is outside [0, {MAX_GUIDANCE}]")
        return settings

    async def _add_paint(self, job: Job, body: Painting, resize: bool) -> None:
        """Regions as (H, W) bool masks at the model's resolution; word checks happen in the Sampler."""
        if job.prompts is None:
            raise RequestError("paint: needs a prompt (it steers where the prompt's words go)")
        if not body.paint:
            raise RequestError("paint: empty list; leave it out for no painting")
        size = (await self.model_info())["resolution"]
        pairs = []
        for i, region in enumerate(body.paint):
            where = f"paint.{i}"
            if (region.box is None) == (region.mask is None):
                raise RequestError(f"{where}: give a box or a mask (one of them)")
            if region.box is not None:
                x0, y0, x1, y1 = region.box if len(region.box) == 4 else (None,) * 4
                if x0 is None or not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
                    raise RequestError(f"{where}.box: must be [x0, y0, x1, y1] inside the {size}x{size} image "
                                       f"with x0 < x1 and y0 < y1, got {region.box}")
                area = np.zeros((size, size), dtype=bool)
                area[y0:y1, x0:x1] = True
            else:
                picture = decode_image(region.mask, f"{where}.mask", self.args.max_image_side)
                if picture.size != (size, size) and not resize:
                    raise RequestError(f"{where}.mask: {picture.size[0]}x{picture.size[1]}, but this model takes "
                                       f"{size}x{size}")
                area = mask_pixels(picture, size)
            pairs.append((region.word, area))
        job.paint = [pairs] * job.rows
        job.paint_weight, job.paint_fraction = body.paint_weight, body.paint_fraction


def replica_resources(settings: ServeArgs) -> tuple[float, float]:
    """(CPUs, GPUs) of the model replica: as given, else a GPU when the cluster has one, and 1 CPU with a GPU
    or all the CPUs of the largest node without (Ray sets a replica's torch threads to its CPUs)."""
    import ray

    live = ray.is_initialized()
    gpus = settings.num_gpus
    if gpus is None:
        gpus = 1 if live and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    cpus = settings.num_cpus
    if cpus is None:
        nodes = ray.nodes() if live and not gpus else []
        cpus = max([node["Resources"].get("CPU", 0) for node in nodes if node["Alive"]] + [1])
    return cpus, gpus


def app(args: dict) -> serve.Application:
    """Application builder: `serve run jobs.serve:app model=...` or `import_path: jobs.serve:app` in a config."""
    try:
        settings = ServeArgs.model_validate(args)
    except ValidationError as exc:
        raise ValueError(f"invalid serve arguments:\n{exc}") from None
    cpus, gpus = replica_resources(settings)
    plain = json.loads(settings.model_dump_json())
    sampler = Sampler.options(ray_actor_options={"num_cpus": cpus, "num_gpus": gpus},
                              max_ongoing_requests=max(2 * settings.max_batch_size, 8)).bind(plain)
    return Ingress.options(ray_actor_options={"num_cpus": 0}).bind(sampler, plain)
