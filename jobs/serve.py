"""Ray Serve sampling service: a FastAPI ingress in front of a batched model deployment.

    serve run jobs.serve:app model=runs/demo/model          # http://127.0.0.1:8000/ (web page), /docs (API)
    serve run jobs.serve:app model=runs:/<run id>/model max_samples=4
    serve run jobs.serve:app model=models:/psunet/3         # a version in the MLflow Model Registry
    serve deploy cluster/serve.yaml                          # replicas, autoscaling, GPUs on a cluster

Endpoints: POST /v1/text-to-image, /v1/image-to-text, /v1/generate, /v1/infill (the first and the
last take paint-with-words regions for prompt words; each answers JSON, or Server-Sent Events with
`"stream": true`: progress per step, previews, the result), POST /v1/cancel/<request id> (a streamed
request); GET /healthz (the model replica answers), /v1/model, /v1/stats (batching and overload counters),
/ (web page).
Every request becomes rows of a sampler run (`PSUNetPipeline.start_infill`); the model deployment batches at
the level of sampler steps: each forward carries every running request, each at its own step, a request
that arrives mid-way joins at the next step (continuous batching) and one that goes away (client
disconnected, cancelled, timed out) leaves at the next step. Rows have their own seed and (image, text)
guidance scales, so a sample does not depend on its batch mates. Sampler settings a request leaves out
come from the service's `defaults` (SamplerSettings), and SamplerSettings checks them all.
Safety: binds 127.0.0.1 unless configured, body size limit, bounded samples/steps/image size and pixel
count, JSON only (no pickle, no code from requests), a per-request timeout; a model replica that dies
costs its requests in flight a 503, and Serve starts another. Overload: past max_pending_requests in progress
a request is refused at once with 503 and Retry-After (counted in /v1/stats) rather than queued toward its
timeout.
"""


import asyncio
import base64
import binascii
import io
import json
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import RequestCancelledError

from jobs.model_ref import MODEL_HELP
from psunet.config import StrictModel
from psunet.diffusion import check_scheduler, schedulers_for
from psunet.paint import box_region
from psunet.settings import MAX_STEPS, SamplerSettings

PAGE = Path(__file__).with_name("serve_page.html")
SETTINGS = SamplerSettings.model_fields
GUIDANCE = ("guidance_scale_image", "guidance_scale_text")
MAX_GUIDANCE = 100  # the service's bound on a guidance scale
IMAGE_FORMATS = ("PNG", "JPEG")  # what requests may send (Pillow's format names)
IMAGE_FORMATS_TEXT = " or ".join(IMAGE_FORMATS)
HEALTH_TIMEOUT_S = 10
HEALTH_CHECK_PERIOD_S = 2  # how often Serve checks the model replica: a dead one is replaced this much sooner


class ServeArgs(StrictModel):
    """Application arguments (`serve run jobs.serve:app key=value` or `args:` in the Serve config)."""

    model: str = Field(description=MODEL_HELP)
    weights: Literal["ema", "model"] = "ema"
    tracking_uri: str | None = None
    device: str | None = Field(None, description="default: cuda when the replica has a GPU, else cpu")
    num_gpus: float | None = Field(None, ge=0, description="per model replica; default: 1 if the cluster has GPUs")
    num_cpus: float | None = Field(None, ge=0, description="per model replica, also its torch threads; default: 1 "
                                                            "with a GPU, else all the CPUs of the largest node (1 when "
                                                            "built before Ray runs) and a thread per CPU of its node")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: GPUs and CPUs with native bf16")
    max_samples: int = Field(8, ge=1, le=256, description="most samples one request may ask for")
    max_steps: int = Field(100, ge=1, le=MAX_STEPS)
    max_prompt_chars: int = Field(300, ge=1)
    max_image_side: int = Field(2048, ge=8, description="largest uploaded image side before resizing")
    max_body_bytes: int = Field(8 << 20, ge=1024)
    request_timeout_s: float = Field(120, gt=0)
    max_batch_size: int = Field(64, ge=1, description="most samples in one forward (all running requests together)")
    max_pending_requests: int = Field(64, ge=1, description="most requests in the service at once, sampling or "
                                      "waiting for a step (per Ingress replica); past it a request gets 503 with "
                                      "Retry-After at once instead of queueing toward its timeout")
    retry_after_s: int = Field(2, ge=1, description="the Retry-After header of an overload 503, in seconds")
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
    guidance_interval: list[float] | None = Field(None, description=SETTINGS["guidance_interval"].description)
    clamp_text: bool | None = Field(None, description=SETTINGS["clamp_text"].description)
    text_eta: float | None = Field(None, description=SETTINGS["text_eta"].description)
    stream: bool = Field(False, description="answer with Server-Sent Events: start, progress per step, previews, "
                                            "then the result (the same JSON as without stream)")
    preview_every: int = Field(0, ge=0, description="with stream: a preview (the current estimate, decoded) every "
                                                    "this many steps; 0: none")


class PaintRegion(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    word: int | str = Field(description="the prompt's word, or its index in the prompt (0 = first word)")
    box: list[int] | None = Field(None, description="[x0, y0, x1, y1] in pixels at the model's resolution")
    mask: str | None = Field(None, description=f"{IMAGE_FORMATS_TEXT} base64 at the model's resolution; "
                                                 "white = the word goes here")


class Painting(BaseModel):
    """Paint-with-words fields shared by the requests that take a prompt."""

    paint: list[PaintRegion] | None = Field(None, description="regions for prompt words (eDiff-I paint-with-words)")
    paint_weight: float = Field(1.0, ge=0, le=100, allow_inf_nan=False, description="bias strength w")
    paint_fraction: float = Field(1.0, gt=0, le=1, description="share of the steps (the noisiest) with the bias")


class TextToImage(Options, Painting):
    prompt: str = Field(description="a caption; [?] marks a word to fill in")
    response_format: Literal["json", "png"] = Field("json", description="png: the image itself (num_samples 1)")


class ImageToText(Options):
    image: str = Field(description=f"{IMAGE_FORMATS_TEXT}, base64 (a data: URL prefix is accepted)")
    resize: bool = Field(False, description="resize to the model's resolution instead of refusing another size")


class Generate(Options):
    pass


class Infill(Options, Painting):
    prompt: str | None = Field(None, description="partial caption with [?] blanks (omit: caption unknown)")
    image: str | None = Field(None, description=f"{IMAGE_FORMATS_TEXT}, base64 (omit: image unknown)")
    mask: str | None = Field(None, description=f"{IMAGE_FORMATS_TEXT} base64 the image's size; "
                                                 "white = generate, black = keep")
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
    preview_every: int = 0  # streamed: a preview every this many steps

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
        return (run.steps, run.scheduler, run.spacing, run.guidance_interval, run.clamp_text, run.text_eta,
                self.prompts is not None, self.images is not None, self.masks is not None, painting)


def decode_image(data: str, field: str, max_side: int) -> Image.Image:
    """base64 (optionally a data: URL) of a PNG or JPEG -> PIL image; a clear RequestError for anything else."""
    if not isinstance(data, str) or not data.strip():
        raise RequestError(f"{field}: empty")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{field}: not valid base64") from None
    too_large = f"larger than the limit of {max_side} px a side"
    try:
        image = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError:  # Pillow refuses it from the header, before decoding a pixel
        raise RequestError(f"{field}: too many pixels to decode safely (a decompression bomb), {too_large}") from None
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise RequestError(f"{field}: the bytes are not a {IMAGE_FORMATS_TEXT} image") from None
    if image.format not in IMAGE_FORMATS:
        raise RequestError(f"{field}: a {image.format} image; send {IMAGE_FORMATS_TEXT}")
    if max(image.size) > max_side:
        raise RequestError(f"{field}: {image.size[0]}x{image.size[1]} is {too_large}")
    try:
        image.verify()
        image = Image.open(io.BytesIO(raw))
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


def encode_pngs(images: np.ndarray) -> list[str]:
    return [base64.b64encode(encode_png(image)).decode() for image in images]


def sse_event(kind: str, data: dict) -> bytes:
    """One Server-Sent Event: `event: <kind>` and its JSON data."""
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


async def next_or_cancel(events, cancelled: asyncio.Event, deadline: float) -> dict | None:
    """The stream's next event, or None when `cancelled` is set first; TimeoutError after `deadline`."""
    following = asyncio.ensure_future(events.__anext__())
    stop = asyncio.ensure_future(cancelled.wait())
    remaining = deadline - asyncio.get_running_loop().time()
    done, _ = await asyncio.wait({following, stop}, timeout=max(remaining, 0),
                                 return_when=asyncio.FIRST_COMPLETED)
    stop.cancel()
    if following in done:
        return following.result()
    following.cancel()
    if stop in done:
        return None
    raise asyncio.TimeoutError


def replica_failure(exc: Exception) -> JSONResponse:
    """A JSON 5xx for a request the model replica did not answer: 503 when the replica died or cannot be reached
    (Serve starts a new one: retry), 500 for an error while sampling."""
    if isinstance(exc, (RayActorError, ActorUnavailableError)):
        return _error("the model replica stopped while sampling (Serve is starting a new one); retry in a few "
                      f"seconds [{type(exc).__name__}]", 503)
    return _error(failure_text(exc), 500)


# ---- model deployment --------------------------------------------------------------------------------------

@dataclass
class Ticket:
    """A job inside the Sampler: the future its request awaits and, when streamed, the queue of its events.

    A request that goes away (its client disconnected, it was cancelled or timed out) cancels the future."""

    job: Job
    answer: asyncio.Future
    events: asyncio.Queue | None = None

    @property
    def gone(self) -> bool:
        """Answered, or nobody waits for the answer any more."""
        return self.answer.done()

    def post(self, event: dict) -> None:
        if self.events is not None and not self.gone:
            self.events.put_nowait(event)

    def finish(self, outcome: dict | BaseException) -> None:
        """Answer with a result (or {"error": reason}: the model refused the input) or an exception."""
        if self.gone:
            return
        if self.events is not None:  # a streamed request reads its answer from its events
            if isinstance(outcome, BaseException):
                self.post({"event": "error", "error": failure_text(outcome), "status": 500})
            elif "error" in outcome:
                self.post({"event": "error", "error": outcome["error"], "status": 422})
            else:
                self.post({"event": "result", "output": outcome})
            self.answer.set_result(None)
        elif isinstance(outcome, BaseException):
            self.answer.set_exception(outcome)
        else:
            self.answer.set_result(outcome)


def failure_text(exc: BaseException) -> str:
    """One line for an unexpected error: the type and the first line of the message."""
    exc = getattr(exc, "cause", None) or exc  # a RayTaskError carries the exception raised in the replica
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"sampling failed: {type(exc).__name__}" + (f": {first}" if first else "")


@serve.deployment(max_ongoing_requests=128, health_check_period_s=HEALTH_CHECK_PERIOD_S)
class Sampler:
    """Holds the PSUNetPipeline and samples every job under way together, one sampler step at a time.

    Step-level (continuous) batching: each forward carries every running job, each at its own step;
    a job that arrives while others run joins at their next step, and leaves as soon as its last
    step is done, or at the next step when its request goes away (its rows leave the run, the others'
    samples do not change). Jobs that arrive together and share what a run must share (steps, scheduler,
    spacing, which inputs are given, paint settings) start as one run; a run has a seed and (image, text)
    guidance scales per row, so a sample does not depend on its batch mates. A streamed job gets an event
    per step, a preview every `preview_every` steps, then its result.
    """

    def __init__(self, args: dict):
        import torch

        from jobs.model_ref import load_pipeline

        self.args = ServeArgs.model_validate(args)
        device = self.args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        threads = replica_threads(self.args.num_cpus, device)
        if threads is not None:
            torch.set_num_threads(threads)
        self.pipe = load_pipeline(self.args.model, weights=self.args.weights, device=device,
                                  tracking_uri=self.args.tracking_uri, precision=self.args.precision)
        self.waiting: list[Ticket] = []
        self.arrived = asyncio.Event()
        self.worker: asyncio.Task | None = None
        self.forwards = self.request_forwards = self.cancelled = 0
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
                "experts": [list(pair) for pair in getattr(pipe.model, "intervals", [])] or None,
                "schedulers": list(schedulers_for(pipe.diffusion_config))}

    def stats(self) -> dict:
        return {"forwards": self.forwards, "request_forwards": self.request_forwards,
                "requests_per_forward": dict(self.requests_per_forward),
                "samples_per_forward": dict(self.samples_per_forward),
                "largest_forward_requests": max(self.requests_per_forward, default=0), "waiting": len(self.waiting),
                "cancelled": self.cancelled}

    async def health(self) -> dict:
        """Answered by the replica's event loop, which the step loop leaves free while the model runs."""
        return {"waiting": len(self.waiting)}

    def refusal(self, job: Job) -> str | None:
        """Why the model cannot take the job's scheduler, prompt or paint regions, or None."""
        try:
            check_scheduler(job.settings.scheduler, self.pipe.diffusion_config)
        except ValueError as exc:
            return str(exc)
        try:
            if job.prompts is not None:
                self.pipe.check_prompts(job.prompts[:1])
        except ValueError as exc:
            return "prompt: " + str(exc).removeprefix("prompt 0 ")
        try:
            if job.paint is not None:
                self.pipe.paint_regions(job.prompts[:1], job.paint[:1], job.paint_weight, job.paint_fraction)
        except ValueError as exc:
            return str(exc).replace("prompt 0", "the prompt")
        return None

    def _enqueue(self, job: Job, streamed: bool) -> Ticket:
        ticket = Ticket(job, asyncio.get_running_loop().create_future(), asyncio.Queue() if streamed else None)
        self.waiting.append(ticket)
        self.arrived.set()
        if self.worker is None or self.worker.done():
            self.worker = asyncio.get_running_loop().create_task(self._sample())
        return ticket

    async def run(self, job: Job) -> dict:
        """The job's output, or {"error": reason} when the model cannot take it."""
        refusal = self.refusal(job)
        if refusal is not None:
            return {"error": refusal}
        return await self._enqueue(job, streamed=False).answer  # cancelled with the request: leaves at the next step

    async def stream(self, job: Job):
        """The job as events: {"event": "accepted"} (or an "error" the model refused it with), a "progress" per
        step, a "preview" every job.preview_every steps, then "result" (run's output) or "error"."""
        refusal = self.refusal(job)
        if refusal is not None:
            yield {"event": "error", "error": refusal, "status": 422}
            return
        ticket = self._enqueue(job, streamed=True)
        try:
            yield {"event": "accepted"}
            while True:
                event = await ticket.events.get()
                yield event
                if event["event"] in ("result", "error"):
                    return
        finally:  # the request went away (disconnected, cancelled): its rows leave at the next step
            if not ticket.gone:
                ticket.answer.cancel()

    async def _sample(self) -> None:
        """The step loop; whatever breaks it answers every job it holds with the error (the next job starts a new
        loop), so no request waits forever."""
        running: list[Running] = []
        try:
            await self._loop(running)
        except Exception as exc:
            finish_all([t for entry in running for t in entry.tickets] + self.waiting, exc)
            self.waiting.clear()
            raise

    async def _loop(self, running: list["Running"]) -> None:
        """Admit waiting jobs, drop the rows of requests that went away, one forward for all running jobs, send
        progress and previews, answer the jobs that are done."""
        while True:
            if not running:
                if not self.waiting:
                    self.arrived.clear()
                    await self.arrived.wait()
                await asyncio.sleep(self.args.batch_wait_timeout_s)  # idle: let a burst arrive together
            for entry in running:
                self.cancelled += entry.prune()
            running[:] = [entry for entry in running if entry.tickets]
            running += await self._admit(sum(entry.samples for entry in running))
            if not running:
                continue
            try:
                await asyncio.to_thread(self.pipe.step, [entry.pending.run for entry in running])
            except Exception as exc:  # answer every request of this forward; keep serving the next ones
                for entry in running:
                    entry.finish(exc)
                running.clear()
                continue
            requests = sum(len(entry.tickets) for entry in running)
            self.forwards += 1
            self.requests_per_forward[requests] += 1
            self.request_forwards += requests
            self.samples_per_forward[sum(entry.samples for entry in running)] += 1
            for entry in running:
                await self._report(entry)
            running[:] = [entry for entry in running if not entry.pending.run.done]

    async def _report(self, entry: "Running") -> None:
        """After a step: progress (and due previews) to streamed jobs; the result to every job when the run is done."""
        run = entry.pending.run
        if run.done:
            try:
                result = await asyncio.to_thread(self.pipe.finish_infill, entry.pending)
            except Exception as exc:
                entry.finish(exc)
                return
        for ticket, rows in entry.rows():
            if ticket.gone:
                continue
            ticket.post({"event": "progress", "step": run.index, "steps": run.steps})
            every = ticket.job.preview_every
            if run.done:
                ticket.finish({"images": result.images[rows], "captions": result.captions[rows],
                               "unknown_words": result.unknown_words[rows],
                               "network_evaluations": result.network_evaluations})
            elif ticket.events is not None and every and run.index % every == 0:
                shown = await asyncio.to_thread(self.pipe.preview, entry.pending, rows)
                ticket.post({"event": "preview", "step": run.index, "steps": run.steps,
                             "images": shown.images, "captions": shown.captions})

    async def _admit(self, running_samples: int) -> list["Running"]:
        """Start waiting jobs while the forward has room (max_batch_size samples; one job always fits)."""
        admitted: list[Ticket] = []
        while self.waiting and (running_samples == 0 or
                                running_samples + self.waiting[0].job.rows <= self.args.max_batch_size):
            ticket = self.waiting.pop(0)
            if not ticket.gone:
                admitted.append(ticket)
                running_samples += ticket.job.rows
        groups: dict[tuple, list[Ticket]] = {}
        for ticket in admitted:
            groups.setdefault(ticket.job.group, []).append(ticket)
        started = []
        for tickets in groups.values():
            try:
                started.append(Running(tickets, await asyncio.to_thread(self._start, [t.job for t in tickets])))
            except ValueError as exc:  # the sampler refused these inputs: answer each request, keep serving
                finish_all(tickets, {"error": str(exc)})
            except Exception as exc:
                finish_all(tickets, exc)
        return started

    def _start(self, jobs: list[Job]):
        """One sampler run (PSUNetPipeline.start_infill) for jobs that share steps, scheduler, spacing and which inputs they
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


@dataclass
class Running:
    """A sampler run under way (a PendingInfill) and the jobs whose rows it holds, in row order."""

    tickets: list[Ticket]
    pending: object

    @property
    def samples(self) -> int:
        return sum(ticket.job.rows for ticket in self.tickets)

    def rows(self) -> list[tuple[Ticket, slice]]:
        spans, start = [], 0
        for ticket in self.tickets:
            spans.append((ticket, slice(start, start + ticket.job.rows)))
            start += ticket.job.rows
        return spans

    def prune(self) -> int:
        """Drop the rows of jobs whose requests went away; how many went."""
        kept = [(ticket, rows) for ticket, rows in self.rows() if not ticket.gone]
        gone = len(self.tickets) - len(kept)
        if gone and kept:
            self.pending.keep([row for _, rows in kept for row in range(rows.start, rows.stop)])
        self.tickets = [ticket for ticket, _ in kept]
        return gone

    def finish(self, outcome: dict | BaseException) -> None:
        finish_all(self.tickets, outcome)


def finish_all(tickets: list[Ticket], outcome: dict | BaseException) -> None:
    for ticket in tickets:
        ticket.finish(outcome)


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
        self.in_flight: dict[str, asyncio.Event] = {}  # streamed request id -> set to cancel it
        self.pending = 0  # requests admitted and not yet answered (streamed: until the stream ends)
        self.refused = 0  # requests refused with 503 because max_pending_requests were pending
        BodyLimit.limit = self.args.max_body_bytes

    async def model_info(self) -> dict:
        if self._model is None:
            self._model = await self.sampler.describe.remote()
        return self._model

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())

    @api.get("/healthz")
    async def healthz(self):
        """200 when a model replica answers within HEALTH_TIMEOUT_S, else 503 with the reason."""
        try:
            await asyncio.wait_for(self.sampler.health.remote(), HEALTH_TIMEOUT_S)
        except Exception as exc:
            reason = "no answer" if isinstance(exc, asyncio.TimeoutError) else failure_text(exc)
            return JSONResponse({"status": "unavailable", "error": f"model replica: {reason}"}, status_code=503)
        return {"status": "ok"}

    @api.get("/v1/model")
    async def model(self) -> dict:
        info = await self.model_info()
        limits = {k: getattr(self.args, k) for k in ("max_samples", "max_steps", "max_prompt_chars",
                                                       "max_image_side", "max_body_bytes", "request_timeout_s")}
        return {**info, "limits": limits, "defaults": self.args.defaults.model_dump()}

    @api.get("/v1/stats")
    async def stats(self) -> dict:
        return {**await self.sampler.stats.remote(), "pending": self.pending, "refused_overloaded": self.refused}

    def _overloaded(self) -> JSONResponse:
        self.refused += 1
        return JSONResponse({"error": f"the service is at its limit of {self.args.max_pending_requests} requests in "
                                      f"progress; retry in {self.args.retry_after_s} s"},
                            status_code=503, headers={"Retry-After": str(self.args.retry_after_s)})

    @api.post("/v1/text-to-image")
    async def text_to_image(self, body: TextToImage):
        if body.response_format == "png" and body.num_samples != 1:
            return _error("response_format: png returns one image; use json for num_samples > 1")
        if body.response_format == "png" and body.stream:
            return _error("response_format: png is not streamed; use json with stream: true")
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

    @api.post("/v1/cancel/{request_id}")
    async def cancel(self, request_id: str):
        """Cancel a streamed request by the id its start event gave (disconnecting cancels too)."""
        cancelled = self.in_flight.get(request_id)
        if cancelled is None:
            return _error(f"no streamed request {request_id} is in flight here", 404)
        cancelled.set()
        return {"request_id": request_id, "cancelled": True}

    async def _serve(self, body: Options, prompt: str | None = None, image: str | None = None,
                     mask: str | None = None, resize: bool = False, keep: tuple[str, ...] = ("images", "captions"),
                     paint: Painting | None = None):
        try:
            if body.preview_every and not body.stream:
                raise RequestError("preview_every: previews come with stream: true")
            job = await self._job(body, prompt, image, mask, resize)
            if paint is not None and paint.paint is not None:
                await self._add_paint(job, paint, resize)
        except RequestError as exc:
            return exc.response()
        if self.pending >= self.args.max_pending_requests:
            return self._overloaded()
        self.pending += 1
        streaming = False
        try:
            if body.stream:
                answer = await self._stream(job, lambda output: self._answer(job, output, keep, prompt))
                streaming = isinstance(answer, StreamingResponse)  # then the stream's end releases it
                return answer
            return await self._sample(job, keep, prompt)
        finally:
            if not streaming:
                self.pending -= 1

    async def _sample(self, job: Job, keep: tuple[str, ...], prompt: str | None):
        response = self.sampler.run.remote(job)
        try:
            output = await asyncio.wait_for(response, self.args.request_timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            return self._timed_out()
        except asyncio.CancelledError:  # the client went away: so does the job
            response.cancel()
            raise
        except Exception as exc:
            return replica_failure(exc)
        if "error" in output:
            return _error(output["error"])
        return self._answer(job, output, keep, prompt)

    @property
    def _timeout_text(self) -> str:
        return f"timed out after {self.args.request_timeout_s:g} s"

    def _timed_out(self) -> JSONResponse:
        return _error(self._timeout_text, 504)

    def _answer(self, job: Job, output: dict, keep: tuple[str, ...], prompt: str | None) -> dict:
        """The response body for a finished job (the same streamed or not)."""
        run = job.settings
        image_scale, text_scale = run.guidance
        answer = {"captions": output["captions"], "seeds": job.seeds,
                  **run.model_dump(include={"steps", "scheduler", "spacing", "guidance_interval", "clamp_text",
                                            "text_eta", *GUIDANCE}),
                  "guidance_scale": image_scale if image_scale == text_scale else None,  # null when they differ
                  "network_evaluations_per_sample": output["network_evaluations"]}
        if "images" in keep:
            answer["images"] = encode_pngs(output["images"])
        if prompt is not None:
            answer["unknown_words"] = output["unknown_words"][0]
        return answer

    async def _stream(self, job: Job, answer) -> Response:
        """Server-Sent Events for a job: start (request id, steps), progress per step, previews, then result (the
        non-streamed answer) or error; cancelled when the client disconnects or /v1/cancel/<id> is called."""
        events = self.sampler.stream.options(stream=True).remote(job)
        deadline = asyncio.get_running_loop().time() + self.args.request_timeout_s
        try:
            first = await asyncio.wait_for(events.__anext__(), self.args.request_timeout_s)
        except asyncio.TimeoutError:
            events.cancel()
            return self._timed_out()
        except asyncio.CancelledError:
            events.cancel()
            raise
        except Exception as exc:
            return replica_failure(exc)
        if first["event"] == "error":
            return _error(first["error"], first["status"])
        request_id = uuid.uuid4().hex
        cancelled = self.in_flight[request_id] = asyncio.Event()

        async def sse():
            step, finished = 0, False
            try:
                yield sse_event("start", {"request_id": request_id, "steps": job.settings.steps})
                while not finished:
                    event = await next_or_cancel(events, cancelled, deadline)
                    if event is None:
                        yield sse_event("cancelled", {"step": step, "steps": job.settings.steps})
                        return
                    kind = event["event"]
                    if kind == "progress":
                        step = event["step"]
                        yield sse_event(kind, {"step": step, "steps": event["steps"]})
                    elif kind == "preview":
                        yield sse_event(kind, {"step": event["step"], "steps": event["steps"],
                                               "images": encode_pngs(event["images"]),
                                               "captions": event["captions"]})
                    elif kind == "result":
                        finished = True
                        yield sse_event(kind, answer(event["output"]))
                    else:
                        finished = True
                        yield sse_event("error", {"error": event["error"], "status": event["status"]})
            except asyncio.TimeoutError:
                yield sse_event("error", {"error": self._timeout_text, "status": 504})
            except (StopAsyncIteration, RequestCancelledError):
                yield sse_event("error", {"error": "the model replica ended the request", "status": 503})
            except Exception as exc:
                failed = replica_failure(exc)
                yield sse_event("error", {**json.loads(failed.body), "status": failed.status_code})
            finally:
                self.in_flight.pop(request_id, None)
                self.pending -= 1
                if not finished:
                    events.cancel()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _job(self, body: Options, prompt, image, mask, resize) -> Job:
        a = self.args
        if body.num_samples > a.max_samples:
            raise RequestError(f"num_samples: {body.num_samples} is over the server limit of {a.max_samples}")
        rows = body.num_samples
        job = Job(rows, self._settings(body), preview_every=body.preview_every)
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
                try:
                    area = box_region(region.box, size)
                except ValueError as exc:
                    raise RequestError(f"{where}.box: {exc}") from None
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
    """(CPUs, GPUs) the model replica asks Ray for: as given, else a GPU when there is one, and 1 CPU with a GPU
    or all the CPUs of the largest node without. `serve run` builds the application before it starts or joins Ray:
    then the GPUs are this machine's and 1 CPU is asked for (the replica still runs a thread per CPU of its node,
    see replica_threads)."""
    import ray

    live = ray.is_initialized()
    gpus = settings.num_gpus
    if gpus is None:
        if live:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        else:
            import torch

            gpus = 1 if torch.cuda.is_available() else 0
    cpus = settings.num_cpus
    if cpus is None:
        nodes = ray.nodes() if live and not gpus else []
        cpus = max([node["Resources"].get("CPU", 0) for node in nodes if node["Alive"]] + [1])
    return cpus, gpus


def replica_threads(num_cpus: float | None, device: str) -> int | None:
    """Torch threads of the model replica, decided where it runs: num_cpus when given, else every CPU Ray gives the
    node it runs on (CPU sampling wants every core); None (Ray's default) on a GPU."""
    if device.startswith("cuda"):
        return None
    if num_cpus is not None:
        return max(1, int(num_cpus))
    import ray

    here = ray.get_runtime_context().get_node_id()
    cpus = [node["Resources"].get("CPU", 1) for node in ray.nodes() if node["NodeID"] == here]
    return max(1, int(cpus[0] if cpus else 1))


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
