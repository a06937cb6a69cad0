"""An OpenAI-compatible HTTP server over the continuous-batching engine core.

    python -m infer.serve --model PATH [--mesh SPEC] [--max-batch N] [--max-len L] [--port 8000]
        [--host 127.0.0.1] [--prefix-cache-bytes B] [--max-queue Q] [--decode-steps K] [--prefill-budget T] [--dtype float32|bfloat16]
        [--served-model-name NAME] [--speculative K]

Endpoints: POST /v1/chat/completions, POST /v1/completions (SSE streaming or not), GET /v1/models, /health,
/metrics (Prometheus). Bad input is an HTTP 400 with OpenAI's error body naming the field (404 for an unknown
model, 429 when the queue is full, 503 while draining). SIGTERM (or SIGINT) drains: requests in flight finish,
new ones get 503, then the server exits; a second signal exits at once.

--speculative K (1..4) decodes with K drafts of the checkpoint's MTP block per step (`infer.speculative`, in the
engine core); each response's `usage` then carries `mean_acceptance_length` (tokens per verify step, over its
choices) and /metrics vLLM-style `qwen35_spec_decode_num_{drafts,draft_tokens,accepted_tokens}_total` counters.

Threads: the engine core's scheduler thread calls each request's on_output; `Submission` hands the outputs to
the event loop with `call_soon_threadsafe` into one asyncio.Queue per HTTP request.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from infer.chat_parsing import THINK_END, THINK_START, ReasoningParser, ToolCallParser, prompt_opens_reasoning
from infer.metrics import Metrics, RequestTimer
from infer.openai_api import (APIError, GenerationOptions, has_images, parse_chat, parse_completion, parse_json,
                              sampling_field_of)
from infer.openai_responses import (SSE_DONE, ChatChoice, CompletionChoice, TokenText, new_id, response, sse,
                                    usage)
from infer.scheduler import QueueFull, ShuttingDown
from qwen35_jax.cli import argument_parser, command
from qwen35_jax.vision.chat import vision_chat_prompt
from qwen35_jax.vision.processing import VisionInputError
from qwen35_jax.vision.rope_index import PlaceholderError

log = logging.getLogger(__name__)
DISCONNECT_POLL_S = 0.25      # how often a non-streaming request checks that its client is still there


class Submission:
    """The engine requests behind one HTTP request (n choices x prompts); their outputs arrive, in order per
    choice, on one asyncio.Queue as (choice index, TokenOutput)."""

    def __init__(self, core, metrics: Metrics, arrival: float):
        self.core, self.metrics, self.arrival = core, metrics, arrival
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.requests, self.finished = [], set()

    def submit(self, prompt_ids: list[int], params, logprobs: int | None) -> None:
        index, timer = len(self.requests), RequestTimer(self.arrival)

        def on_output(out) -> None:   # on the scheduler thread: must never raise
            try:
                self.metrics.on_output(timer, out.finish_reason, out.token_id >= 0 and out.finish_reason
                                       not in ("error", "cancelled"))
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))
            except Exception:  # noqa: BLE001 - e.g. the event loop is closed: the client is gone anyway
                pass
        try:
            self.requests.append(self.core.submit(prompt_ids, params, on_output, logprobs=logprobs))
        except QueueFull as e:
            self.cancel()
            raise APIError(f"the server is overloaded: {e}; retry later", status=429, type="rate_limit_error",
                           code="queue_full") from None
        except ShuttingDown:
            self.cancel()
            raise draining_error() from None
        except ValueError as e:
            self.cancel()
            raise APIError(str(e), "prompt") from None

    def cancel(self) -> None:
        """Cancels every request that has not finished (their slots are freed at the next step boundary)."""
        for index, request in enumerate(self.requests):
            if index not in self.finished:
                request.cancel()

    async def batches(self, client: Request | None = None):
        """Yields {choice index: [TokenOutput, ...]} as outputs arrive, until every choice finished. With
        `client`, polls for a disconnect while waiting (then cancels and stops)."""
        while len(self.finished) < len(self.requests):
            try:
                item = await (self.queue.get() if client is None else
                              asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S))
            except asyncio.TimeoutError:
                if await client.is_disconnected():
                    self.cancel()
                    return
                continue
            items = [item]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            grouped: dict[int, list] = {}
            for index, out in items:
                grouped.setdefault(index, []).append(out)
                if out.finish_reason is not None:
                    self.finished.add(index)
            yield grouped

    def mean_acceptance_length(self) -> float | None:
        """Speculative decoding: tokens per verify step over every choice (None before any step)."""
        steps = sum(r.spec_steps for r in self.requests)
        return sum(r.spec_tokens for r in self.requests) / steps if steps else None

    def cached_tokens(self, per_prompt: int) -> int:
        """Prompt tokens served from the prefix cache, counted once per prompt (its first choice)."""
        return sum(r.cached_tokens for r in self.requests[::per_prompt])


def draining_error() -> APIError:
    return APIError("the server is shutting down", status=503, type="service_unavailable", code="shutting_down")


class Server:
    """What the routes share: the core, the engine, the metrics, the draining flag."""

    def __init__(self, core, engine, model_name: str, allowed_local_media_path: str | Path | None = None):
        self.core, self.engine, self.model_name = core, engine, model_name
        # image_url parts may name local files only under this folder (None: data URLs only), as vLLM's flag
        self.media_root = None if allowed_local_media_path is None else Path(allowed_local_media_path).resolve()
        self.tokenizer = engine.tokenizer
        self.metrics = Metrics(core)
        self.token_text = TokenText(self.tokenizer)
        self.think_ids = tuple(None if self.tokenizer is None else self.tokenizer.token_id(t)
                               for t in (THINK_START, THINK_END))
        self.draining = False
        self.drained = threading.Event()
        self.created = int(time.time())

    def begin_drain(self, timeout: float | None = None, then=None) -> None:
        """Stops admitting (new requests get 503), lets running and queued ones finish in a background thread,
        then stops the core and calls `then()`. Idempotent."""
        if self.draining:
            return
        self.draining = True

        def run():
            try:
                self.core.drain(timeout)
            finally:
                self.drained.set()
                if then is not None:
                    then()
        threading.Thread(target=run, name="qwen35-drain", daemon=True).start()

    def check_open(self) -> None:
        if self.draining:
            raise draining_error()

    def submit(self, jobs: list[tuple[list[int], GenerationOptions, str]], arrival: float) -> Submission:
        """jobs: (prompt ids, options, prompt field name) per prompt; n choices each. Validates every choice
        before submitting any."""
        planned = []
        for ids, options, param in jobs:
            for choice in range(options.n):
                try:
                    params = options.sampling_params(len(ids), self.engine.max_len, param, choice)
                except ValueError as e:
                    raise APIError(str(e), sampling_field_of(e)) from None
                planned.append((ids, params, options.logprobs))
        submission = Submission(self.core, self.metrics, arrival)
        for ids, params, logprobs in planned:
            submission.submit(ids, params, logprobs)
        return submission

    def check_chat_template(self) -> None:
        if self.tokenizer is None:
            raise APIError("this model has no tokenizer: use /v1/completions with token-id prompts", "messages")
        if self.tokenizer.chat_template is None:
            raise APIError("this model's tokenizer has no chat template: use /v1/completions", "messages")

    def render_chat(self, req) -> str:
        self.check_chat_template()
        try:
            return self.tokenizer.apply_chat_template(req.messages, tools=req.tools, **req.template_kwargs)
        except TypeError as e:
            raise APIError(f"chat_template_kwargs: {e}", "chat_template_kwargs") from None
        except Exception as e:  # noqa: BLE001 - jinja errors, raise_exception() in the template
            raise APIError(f"messages: the chat template failed: {e}", "messages") from None

    def vision_prompt(self, req):
        """The chat request with image parts as a VisionPrompt (the checkpoint's processor configs)."""
        self.check_chat_template()
        if self.engine.vision is None:
            raise APIError("messages: this model has no vision tower: image_url parts are not supported", "messages")
        for message in req.messages:
            for part in message["content"] if isinstance(message["content"], list) else ():
                if part["type"] == "image_url":
                    self.check_local_media(part["image_url"]["url"])
        try:
            return vision_chat_prompt(self.tokenizer, req.messages, self.engine.config.vision,
                                      self.engine.image_processor, self.engine.video_processor, tools=req.tools,
                                      **req.template_kwargs)
        except (VisionInputError, PlaceholderError) as e:
            raise APIError(f"messages: {e}", "messages") from None
        except TypeError as e:
            raise APIError(f"chat_template_kwargs: {e}", "chat_template_kwargs") from None
        except Exception as e:  # noqa: BLE001 - jinja errors, raise_exception() in the template, image decoders
            raise APIError(f"messages: the chat template or an image failed: {e}", "messages") from None

    def check_local_media(self, url: str) -> None:
        """A data URL passes; a local file only inside --allowed-local-media-path (else a 400)."""
        if url.startswith("data:") or "://" in url and not url.startswith("file://"):
            return  # data URLs are decoded; remote URLs are refused by the processor with their own 400
        if self.media_root is None:
            raise APIError("messages: local image files are not served unless the server was started with "
                           "--allowed-local-media-path DIR; send a data:image/...;base64 URL", "messages")
        path = Path(url.removeprefix("file://")).resolve()
        if not path.is_relative_to(self.media_root):
            raise APIError(f"messages: image file {url!r} is outside --allowed-local-media-path "
                           f"{self.media_root}", "messages")

    def encode(self, prompt: str | list[int], param: str) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        if self.tokenizer is None:
            raise APIError(f"{param}: this model has no tokenizer: send token ids", param)
        return self.tokenizer.encode(prompt)

    # ---- /v1/chat/completions -----------------------------------------------------------------------
    async def chat(self, request: Request):
        arrival = time.perf_counter()
        self.check_open()
        req = parse_chat(parse_json(await request.body()), self.model_name, self.engine.config.vocab_size)
        if has_images(req.messages):
            vision = await asyncio.to_thread(self.vision_prompt, req)  # decoding and resizing: off the event loop
            ids, prompt = list(vision.token_ids), self.tokenizer.decode(vision.token_ids)
        else:
            prompt = self.render_chat(req)
            ids = vision = self.encode(prompt, "messages")
        opts = req.options
        submission = self.submit([(vision, opts, "messages")], arrival)
        opens = prompt_opens_reasoning(prompt)
        choices = [ChatChoice(i, ReasoningParser(opens, req.thinking, *self.think_ids),
                              ToolCallParser() if req.parse_tools else None,
                              self.token_text if opts.logprobs is not None else None, opts.return_token_ids)
                   for i in range(opts.n)]
        meta = (new_id("chatcmpl"), int(time.time()), self.model_name)
        prompt_ids = {"prompt_token_ids": ids} if opts.return_token_ids else {}
        if opts.stream:
            return self._stream(submission, choices, meta, opts, [ids], "chat.completion.chunk", prompt_ids)
        await self._collect(submission, choices, request)
        body = response("chat.completion", *meta, [c.message() for c in choices],
                        usage=self._usage(submission, choices, [ids]), **prompt_ids)
        return JSONResponse(body)

    # ---- /v1/completions ----------------------------------------------------------------------------
    async def completions(self, request: Request):
        arrival = time.perf_counter()
        self.check_open()
        req = parse_completion(parse_json(await request.body()), self.model_name, self.engine.config.vocab_size)
        opts = req.options
        prompts = [self.encode(p, "prompt") for p in req.prompts]
        submission = self.submit([(ids, opts, "prompt") for ids in prompts], arrival)
        choices = [CompletionChoice(i, self.token_text if opts.logprobs is not None else None, opts.return_token_ids)
                   for i in range(len(prompts) * opts.n)]
        meta = (new_id("cmpl"), int(time.time()), self.model_name)
        prompt_ids = {"prompt_token_ids": prompts if len(prompts) > 1 else prompts[0]} if opts.return_token_ids else {}
        if opts.stream:
            return self._stream(submission, choices, meta, opts, prompts, "text_completion", prompt_ids)
        await self._collect(submission, choices, request)
        body = response("text_completion", *meta, [c.final() for c in choices],
                        usage=self._usage(submission, choices, prompts), **prompt_ids)
        return JSONResponse(body)

    # ---- shared -------------------------------------------------------------------------------------
    async def _collect(self, submission: Submission, choices, request: Request) -> None:
        try:
            async for grouped in submission.batches(client=request):
                for index, outputs in grouped.items():
                    choices[index].add(outputs)
        finally:
            submission.cancel()
        if any(c.failed for c in choices):
            raise APIError("the engine failed while generating; see the server log", status=500,
                           type="internal_server_error")

    def _usage(self, submission: Submission, choices, prompts: list[list[int]]) -> dict:
        n = len(choices) // len(prompts)
        body = usage(sum(len(p) for p in prompts), sum(len(c.token_ids) for c in choices),
                     submission.cached_tokens(n))
        if self.engine.num_speculative_tokens:
            body["mean_acceptance_length"] = submission.mean_acceptance_length()
        return body

    def _stream(self, submission, choices, meta, opts, prompts, kind, first_extra) -> StreamingResponse:
        async def events():
            extra = first_extra      # prompt_token_ids go on the first chunk only
            try:
                usage_field = {"usage": None} if opts.include_usage else {}
                if kind == "chat.completion.chunk":   # the first chunk of each choice announces the role
                    for i, choice in enumerate(choices):
                        delta = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}
                        yield sse(response(kind, *meta, [delta], **usage_field, **(extra if i == 0 else {})))
                    extra = {}
                async for grouped in submission.batches():
                    for index, outputs in grouped.items():
                        choice = choices[index].add(outputs)
                        if choices[index].failed:
                            yield sse(APIError("the engine failed while generating; see the server log",
                                               status=500, type="internal_server_error").body())
                        elif choice is not None:
                            yield sse(response(kind, *meta, [choice], **usage_field, **extra))
                            extra = {}
                if opts.include_usage:
                    yield sse(response(kind, *meta, [], usage=self._usage(submission, choices, prompts)))
                yield SSE_DONE
            finally:   # finished, or the client went away (this generator is cancelled or closed)
                submission.cancel()
        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "qwen35-jax", "max_model_len": self.engine.max_len}]}


def create_app(core, engine, model_name: str, allowed_local_media_path: str | Path | None = None) -> FastAPI:
    """The FastAPI app over a started EngineCore. `app.state.begin_drain()` starts a drain (what SIGTERM does).
    allowed_local_media_path: the folder image_url parts may read local files from (None: data URLs only)."""
    server = Server(core, engine, model_name, allowed_local_media_path)
    app = FastAPI(title="qwen35-jax", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server, app.state.begin_drain = server, server.begin_drain

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        first = (e.errors() or [{}])[0]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(APIError(f"{param or 'request'}: {first.get('msg', 'invalid')}", param).body(), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(f"{request.method} {request.url.path}: {e.detail}", status=e.status_code,
                                     type=kind).body(), e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(APIError(f"internal error: {type(e).__name__}: {e}", status=500,
                                     type="internal_server_error").body(), 500)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.chat(request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.completions(request)

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.get("/health")
    async def health():
        if server.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


# ---- the command ----------------------------------------------------------------------------------------
def build_parser():
    p = argument_parser("Serve a Qwen3.5 checkpoint over an OpenAI-compatible HTTP API.", module=__name__)
    p.add_argument("--model", required=True, help="checkpoint folder: Orbax (from convert or finetune) or HF")
    p.add_argument("--mesh", default="", help="device mesh, e.g. 'expert=4,tensor=2' (default: one device)")
    p.add_argument("--max-batch", type=int, default=8, help="decode slots (requests generating at once)")
    p.add_argument("--max-len", type=int, default=4096, help="context per request (prompt + generated tokens)")
    p.add_argument("--max-queue", type=int, default=256, help="requests that may wait for a slot (then HTTP 429)")
    p.add_argument("--decode-steps", type=int, default=4, help="decode steps per device round trip")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prefill chunk (and prefix-cache granularity)")
    p.add_argument("--prefix-cache-bytes", type=int, default=0, help="prefix-cache budget in bytes (0: off)")
    p.add_argument("--prefill-budget", type=int, default=2048,
                   help="prompt tokens prefilled per scheduler step (at least one chunk call runs)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="parameter dtype")
    p.add_argument("--speculative", type=int, default=0, metavar="K",
                   help="speculative decoding: K tokens (1-4) drafted by the checkpoint's MTP block per step and "
                        "verified in one forward (0: off)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the folder name)")
    p.add_argument("--allowed-local-media-path", default=None, metavar="DIR",
                   help="image_url parts may name local files inside DIR (default: data URLs only)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    return p


class DrainingServer(uvicorn.Server):
    """uvicorn, with SIGTERM / SIGINT starting a drain (new requests get 503) and exiting once it is done;
    a second signal exits at once."""

    def handle_exit(self, sig, frame) -> None:
        server = self.config.app.state.server
        if server.draining:
            self.force_exit = self.should_exit = True
            return
        server.begin_drain(then=lambda: setattr(self, "should_exit", True))


@command
def main(argv=None) -> int:
    from infer.engine import Engine
    from infer.scheduler import EngineCore
    from qwen35_jax.sharding import make_mesh

    args = build_parser().parse_args(argv)
    for name in ("max_batch", "max_len", "decode_steps", "prefill_chunk", "prefill_budget", "port"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)}: expected a positive integer")
    if args.prefix_cache_bytes < 0 or args.max_queue < 0:
        raise ValueError("--prefix-cache-bytes and --max-queue must be >= 0")
    if not 0 <= args.speculative <= 4:
        raise ValueError(f"--speculative={args.speculative}: expected 0..4 (0: off)")
    mesh = make_mesh(args.mesh) if args.mesh else None
    engine = Engine.load(args.model, dtype=args.dtype, max_len=args.max_len, mesh=mesh,
                         prefill_chunk=args.prefill_chunk, num_speculative_tokens=args.speculative)
    name = args.served_model_name or Path(args.model).resolve().name
    print(f"compiling (max batch {args.max_batch}, max len {args.max_len}) ...", file=sys.stderr, flush=True)
    core = EngineCore(engine, max_batch=args.max_batch, max_queue=args.max_queue, decode_steps=args.decode_steps,
                      prefix_cache_bytes=args.prefix_cache_bytes, prefill_budget=args.prefill_budget).start()
    app = create_app(core, engine, name, args.allowed_local_media_path)
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level="info")).run()
    if not app.state.server.draining:
        core.drain(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
