"""The serving engine core: continuous batching over fixed decode slots, chunked prefill, prefix caching.

    core = EngineCore(engine, max_batch=8, decode_steps=4, prefix_cache_bytes=1 << 30)
    core.start()                                              # the scheduler thread
    req = core.submit(prompt_ids, SamplingParams.greedy(max_new_tokens=64), on_output=print)
    req.cancel()                                              # frees its slot at the next round
    core.drain()                                              # finish what runs, admit nothing new, stop

Each round: (1) waiting requests take free slots (continuous batching; a finished or cancelled request's slot is
free at once); (2) requests being admitted prefill, one chunk call at a time, within a token budget per round
(resuming from the longest cached prefix, `infer.prefix_cache`); a request whose prompt is done samples its first
token and is written into its slot; (3) every decoding slot runs up to `decode_steps` tokens on device in one call
(`infer.slot_steps.make_steps`' block), and the host turns them into text and outputs. Per-slot sampling parameters are
arrays, every shape is static or bucketed (prefill widths: powers of two up to the prefill chunk), so after
`warmup()` no pattern of text requests compiles anything (`trace_counts()`). A request with images or videos
(a `VisionPrompt`) runs its encoder once when its prefill starts (compiling per new patch bucket) and prefills
through the vision variant of the prefill step (compiled once per width); it is never prefix-cached.

A request is prefilled alone ([1, width] calls, `infer.engine.prefill_chunks`, as `Engine.generate` prefills one
prompt) and decoded in its slot, so its greedy tokens are those of `Engine.generate` for the same prompt.

With an engine built with `num_speculative_tokens` K > 0 the core decodes speculatively: the prefill also fills the
MTP block's cache, a slot carries the MTP carry (`infer.slot_steps`), and each decode step drafts K tokens and
verifies them in one forward (`infer.speculative`), emitting 1..K+1 tokens per slot; logprobs are the target
model's. Prefix-cache snapshots then hold the MTP cache too and are taken only where it is complete (a chunk
boundary before the prompt's last token). Each request reports its mean acceptance length (tokens per verify
step), on its last output and in `stats()` totals.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from infer.engine import Engine, _bucket, _Row, _token_ids, mtp_next_inputs, prefill_chunks
from infer.prefix_cache import PrefixCache
from infer.sampling import SamplingParams, batch_arrays
from infer.slot_steps import MAX_STOP_IDS, MAX_TOP_LOGPROBS, make_steps
from qwen35_jax.vision.multimodal import VisionPrompt

log = logging.getLogger(__name__)
_BACKEND_COMPILES = [0]  # XLA compiles in this process (jitted steps and eager ops alike)


def _count_compile(event: str, *args, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _BACKEND_COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def backend_compiles() -> int:
    """How many XLA compilations this process has run so far (any function, eager ops included)."""
    return _BACKEND_COMPILES[0]


class QueueFull(RuntimeError):
    """The waiting queue is at its bound (HTTP 429)."""


class ShuttingDown(RuntimeError):
    """The core is draining and admits nothing new (HTTP 503)."""


@dataclasses.dataclass
class TokenOutput:
    token_id: int
    text: str                                  # new text (stop strings cut; never half a character)
    finish_reason: str | None                  # None while running; "stop" | "length" | "error" at the end
    logprob: float | None = None               # raw-model log-probability of token_id (when asked)
    top_logprobs: list[tuple[int, float]] | None = None
    completion_tokens: int = 0                 # generated so far, this one included
    mean_acceptance_length: float | None = None  # speculative decoding: tokens per verify step, on the last output


class Request:
    """One submitted generation; `cancel()` is safe from any thread."""

    def __init__(self, core: EngineCore, prompt_ids: list[int], params: SamplingParams,
                 on_output: Callable[[TokenOutput], None], logprobs: int | None, seed: int,
                 vision_prompt: VisionPrompt | None = None):
        self.core, self.prompt_ids, self.params = core, prompt_ids, params
        self.vision_prompt = vision_prompt     # images / videos (never prefix-cached: the ids miss the pixels)
        self.vision = None                     # its host-side vision inputs while prefilling (engine._VisionRows)
        self.on_output, self.logprobs, self.seed = on_output, logprobs, seed
        self.prompt_tokens, self.cached_tokens = len(prompt_ids), 0
        self.row = _Row(params, core.engine.tokenizer)
        self.slot: int | None = None
        self.state = self.logits = None        # the one-row decode state and last logits while prefilling
        self.hidden = None                     # speculative: the final-normed hidden state at the last prefilled token
        self.spec_steps = self.spec_tokens = 0  # speculative: verify steps taken, tokens they emitted
        self.chunks: collections.deque = collections.deque()
        self.length = 0                        # tokens in its decode state
        self.cancelled = self.done = False

    def cancel(self) -> None:
        self.cancelled = True
        self.core._wake()

    @property
    def mean_acceptance_length(self) -> float | None:
        """Speculative decoding: tokens emitted per verify step (accepted drafts + 1); None before any step."""
        return self.spec_tokens / self.spec_steps if self.spec_steps else None


class EngineCore:
    def __init__(self, engine: Engine, max_batch: int = 8, max_queue: int = 256, decode_steps: int = 4,
                 prefix_cache_bytes: int = 0, prefill_budget: int = 2048):
        checks = [(max_batch >= 1, "max_batch", max_batch), (max_queue >= 0, "max_queue", max_queue),
                  (decode_steps >= 1, "decode_steps", decode_steps)]
        for ok, name, value in checks:
            if not ok:
                raise ValueError(f"EngineCore {name}={value}: expected >= 1" if name != "max_queue"
                                 else f"EngineCore max_queue={value}: expected >= 0")
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.decode_steps = decode_steps
        # prompt tokens prefilled per round (as vLLM's chunked-prefill token budget; at least one chunk call runs):
        # admitting several requests per round keeps the batch full (one per round: ~24% more decode time here)
        self.prefill_budget = max(1, prefill_budget)
        self.cache = PrefixCache(prefix_cache_bytes, engine.prefill_chunk)
        self._insert, self._block, self._traces = make_steps(engine, decode_steps)
        self.slots = self._empty_slots()
        self.free = list(range(max_batch))[::-1]
        self.waiting: collections.deque[Request] = collections.deque()
        self.prefilling: list[Request] = []
        self.running: dict[int, Request] = {}
        self.prompt_tokens_total = self.generation_tokens_total = 0
        self.spec_steps_total = self.spec_accepted_total = 0  # speculative: verify steps, accepted drafts
        self._cv = threading.Condition()
        self._draining = self._stopping = self._warm = False
        self._thread: threading.Thread | None = None

    # ---- public API ---------------------------------------------------------------------------
    def submit(self, prompt_ids, params: SamplingParams, on_output: Callable[[TokenOutput], None],
               logprobs: int | None = None) -> Request:
        """Queues a request (token ids, or a VisionPrompt with images / videos); on_output gets each generated
        token (from the scheduler thread)."""
        prompt = self.engine._prompt_ids(prompt_ids if isinstance(prompt_ids, VisionPrompt) else list(prompt_ids))
        ids = _token_ids(prompt)
        if len(ids) > self.engine.max_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; max_len is {self.engine.max_len}")
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs={logprobs}: expected 0..{MAX_TOP_LOGPROBS}")
        seed = params.seed if params.seed is not None else int(np.random.SeedSequence().entropy % (2**31))
        with self._cv:
            if self._draining:
                raise ShuttingDown("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue={self.max_queue})")
            request = Request(self, ids, params, on_output, logprobs, seed,
                              prompt if isinstance(prompt, VisionPrompt) else None)
            self.waiting.append(request)
            self._cv.notify_all()
        return request

    def start(self, warmup: bool = True) -> EngineCore:
        """Compiles every step (unless warmup=False) and starts the scheduler thread."""
        if warmup and not self._warm:
            self.warmup()
        self._thread = threading.Thread(target=self._loop, name="qwen35-engine-core", daemon=True)
        self._thread.start()
        return self

    def drain(self, timeout: float | None = None) -> bool:
        """Admits nothing new, lets queued and running requests finish, stops the thread. True if it did."""
        with self._cv:
            self._draining = True
            self._cv.notify_all()
            done = self._cv.wait_for(lambda: not self._has_work(), timeout)
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        return done

    def stats(self) -> dict:
        with self._cv:
            return {"waiting": len(self.waiting), "running": len(self.prefilling) + len(self.running),
                    "max_batch": self.max_batch, "prompt_tokens_total": self.prompt_tokens_total,
                    "generation_tokens_total": self.generation_tokens_total,
                    "prefix_cache_queries": self.cache.queries, "prefix_cache_hits": self.cache.hits,
                    "prefix_cache_hit_tokens": self.cache.hit_tokens, "prefix_cache_bytes": self.cache.bytes,
                    "num_speculative_tokens": self.engine.num_speculative_tokens,
                    "spec_decode_num_drafts": self.spec_steps_total,
                    "spec_decode_num_draft_tokens": self.spec_steps_total * self.engine.num_speculative_tokens,
                    "spec_decode_num_accepted_tokens": self.spec_accepted_total}

    def trace_counts(self) -> dict:
        """How often each jitted step was traced (compiled): constant after `warmup()` for text requests."""
        return {"prefill": self.engine.prefill_traces, "decode_block": self._traces["decode_block"],
                "insert": self._traces["insert"], "first_sample": self._first_sample_traces()}

    def warmup(self) -> None:
        """Compiles the prefill at every width, the first-token sampler, the slot insert and the decode block."""
        widths = sorted({_bucket(n, self.engine.prefill_chunk) for n in range(1, self.engine.prefill_chunk + 1)})
        request = Request(self, [0], SamplingParams.greedy(), lambda out: None, None, 0)
        request.state = self.engine.init_state(1)
        for width in widths:
            self._prefill_call(request, 0, width)
        token, counts, seen, sampling = self._first_token(request)
        self.slots = self._insert(self.slots, request.state, token, counts, seen, sampling,
                                  jax.device_put(np.ones((1,), np.int32)),
                                  jax.device_put(np.full((1, MAX_STOP_IDS), -1, np.int32)), np.int32(0),
                                  *self._carry_start(request))
        self.slots, _ = self._block(self.engine.params, self.slots, jax.device_put(np.zeros(self.max_batch, bool)),
                                    np.bool_(False))
        jax.block_until_ready(self.slots)
        self.slots = self._empty_slots()
        self._warm = True

    # ---- the scheduler ------------------------------------------------------------------------
    def step(self) -> None:
        """One round: admit, prefill within the budget, decode a block."""
        with self._cv:
            while self.free and self.waiting:
                request = self.waiting.popleft()
                if not request.cancelled:
                    request.slot = self.free.pop()
                    self.prefilling.append(request)
        for request in [r for r in self.prefilling if r.cancelled]:
            self._release(request)
        for request in [r for r in self.running.values() if r.cancelled]:
            self._release(request)
        budget = self.prefill_budget
        for request in list(self.prefilling):
            if budget <= 0:
                break
            if request.state is None and not self._begin_prefill(request):
                continue
            while budget > 0 and request.chunks:
                budget -= self._prefill_chunk(request)
            if not request.chunks:
                self._finish_prefill(request)
        if self.running:
            self._decode_round()

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._has_work() or self._stopping)
                if self._stopping and not self._has_work():
                    return
            try:
                self.step()
            except Exception:  # a failed step fails the requests in flight, never the server
                log.exception("engine core step failed; failing the requests in flight")
                self._fail_all()
            with self._cv:
                self._cv.notify_all()

    def _has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # ---- prefill ------------------------------------------------------------------------------
    def _begin_prefill(self, request: Request) -> bool:
        """Starts the request's prefill (its encoder runs here, once); False if that failed the request."""
        empty = self.engine.init_state(1)
        if request.vision_prompt is not None:
            try:
                request.vision = self.engine._vision_inputs([request.vision_prompt], empty)
            except Exception:  # e.g. an image too large for the device: fails this request, not the batch
                log.exception("the vision encoder failed; failing this request")
                self._fail(request)
                return False
        start, snapshot = self.cache.lookup(request.prompt_ids) if request.vision is None else (0, None)
        request.state = PrefixCache.restore(snapshot, empty) if snapshot is not None else empty
        request.cached_tokens = start
        request.chunks = collections.deque(prefill_chunks(start, len(request.prompt_ids), self.engine.prefill_chunk))
        return True

    def _prefill_chunk(self, request: Request) -> int:
        """One prefill call of the request's next chunk; returns how many prompt tokens it consumed."""
        offset, width = request.chunks.popleft()
        n = self._prefill_call(request, offset, width)
        end = offset + n
        # speculative: the MTP cache holds position i once token i + 1 is known, so it is complete at `end` only
        # when the prompt goes on past it
        complete = not self.engine.num_speculative_tokens or end < len(request.prompt_ids)
        cacheable = n == self.engine.prefill_chunk and request.vision is None and complete
        key = self.cache.wants(request.prompt_ids, end) if cacheable else None
        if key is not None:
            self.cache.store(key, request.state, end)
        return n

    def _prefill_call(self, request: Request, offset: int, width: int) -> int:
        """Prefills the request's prompt tokens [offset, offset + width) into request.state (request.logits, and
        with speculative decoding request.hidden, after them), as `Engine._run_prefill` does for one row: with
        speculative decoding the MTP cache advances over the positions whose next token is known. Returns how
        many prompt tokens it consumed."""
        ids = request.prompt_ids
        piece = ids[offset:offset + width]
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :len(piece)] = piece
        # jax.device_put, not jnp.asarray: the latter compiles a staging op per new shape
        extra = () if request.vision is None else (request.vision.chunk(offset, width),)
        if self.engine.num_speculative_tokens:
            extra = (extra or (None,)) + (mtp_next_inputs([ids], offset, width, request.vision),)
        out = self.engine._prefill(self.engine.params, request.state, jax.device_put(tokens),
                                   jax.device_put(np.array([len(piece)], np.int32)), *extra)
        request.logits, request.state = out[:2]
        if self.engine.num_speculative_tokens:
            request.hidden = out[2]
        return len(piece)

    def _carry_start(self, request: Request) -> tuple:
        """The insert's extra argument: the request's last prefilled hidden state (speculative decoding)."""
        return (request.hidden,) if self.engine.num_speculative_tokens else ()

    def _first_sample_traces(self) -> int:
        size = getattr(self.engine._first_sample_jit, "_cache_size", None)
        return size() if callable(size) else 0

    def _first_token(self, request: Request):
        vocab = self.engine.config.vocab_size
        seen = np.zeros((1, vocab), bool)
        seen[0, request.prompt_ids] = True
        sampling = batch_arrays([request.params], [request.seed])
        token, counts, seen = self.engine._first_sample(request.logits, jnp.zeros((1, vocab), jnp.int32),
                                                        jax.device_put(seen), sampling, 0)
        return token, counts, seen, sampling

    def _finish_prefill(self, request: Request) -> None:
        self.prefilling.remove(request)
        self.prompt_tokens_total += request.prompt_tokens
        token, counts, seen, sampling = self._first_token(request)
        request.length = request.prompt_tokens
        logprob = top = None
        first = int(np.asarray(token)[0])  # host-side indexing: an eager jax op would compile
        if request.logprobs is not None:
            logits = np.asarray(request.logits, np.float64)[0]
            logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
            logprob = float(logp[first])
            order = np.argsort(-logp, kind="stable")[:request.logprobs]
            top = [(int(i), float(logp[i])) for i in order]
        self._emit(request, first, logprob, top)
        if request.done:
            self._release(request)
            return
        stop_ids = np.full((1, MAX_STOP_IDS), -1, np.int32)
        ids = list(self._eos(request)) + list(request.params.stop_token_ids)
        stop_ids[0, :min(len(ids), MAX_STOP_IDS)] = ids[:MAX_STOP_IDS]
        remaining = jax.device_put(np.array([request.params.max_new_tokens - 1], np.int32))
        self.slots = self._insert(self.slots, request.state, token, counts, seen, sampling, remaining,
                                  jax.device_put(stop_ids), np.int32(request.slot), *self._carry_start(request))
        request.state = request.logits = request.vision = request.hidden = None
        self.running[request.slot] = request

    # ---- decode -------------------------------------------------------------------------------
    def _decode_round(self) -> None:
        active = np.zeros(self.max_batch, bool)
        active[list(self.running)] = True
        want = any(r.logprobs for r in self.running.values())
        self.slots, out = self._block(self.engine.params, self.slots, jax.device_put(active), np.bool_(want))
        out = jax.device_get(out)
        valid = out["valid"]  # [steps, slots, tokens per step]
        if self.engine.num_speculative_tokens:
            self.spec_steps_total += int(valid[:, :, 0].sum())
            self.spec_accepted_total += int(out["accepted"][valid[:, :, 0]].sum())
        for k in range(self.decode_steps):
            for slot, request in self.running.items():
                if not valid[k, slot, 0] or request.done:
                    continue
                if self.engine.num_speculative_tokens:
                    request.spec_steps += 1
                    request.spec_tokens += int(valid[k, slot].sum())
                for m in range(valid.shape[2]):
                    if not valid[k, slot, m] or request.done:
                        break
                    request.length += 1
                    top = None
                    if request.logprobs:
                        top = [(int(i), float(v)) for i, v in zip(out["top_ids"][k, slot, m][:request.logprobs],
                                                                   out["top_logprobs"][k, slot, m][:request.logprobs])]
                    logprob = float(out["logprob"][k, slot, m]) if request.logprobs is not None else None
                    self._emit(request, int(out["token"][k, slot, m]), logprob, top)
        for request in list(self.running.values()):
            if not request.done and not out["active"][request.slot]:
                log.error("slot %d stopped on device but not on the host; finishing it", request.slot)
                request.done = True
            if request.done:
                self._release(request)

    def _emit(self, request: Request, token: int, logprob, top) -> None:
        cache_full = request.length >= self.engine.max_len
        text = request.row.accept(token, self._eos(request), cache_full)
        request.done = request.row.finish is not None
        self.generation_tokens_total += 1
        mean = request.mean_acceptance_length if request.done else None
        request.on_output(TokenOutput(token, text, request.row.finish, logprob, top, len(request.row.tokens), mean))

    def _eos(self, request: Request) -> tuple[int, ...]:
        tokenizer = self.engine.tokenizer
        return () if request.params.ignore_eos or tokenizer is None else tuple(tokenizer.eos_token_ids)

    def _release(self, request: Request) -> None:
        """Frees the request's slot (finished or cancelled)."""
        request.done = True
        request.state = request.logits = request.vision = request.hidden = None
        if request in self.prefilling:
            self.prefilling.remove(request)
        if self.running.get(request.slot) is request:
            del self.running[request.slot]
        if request.slot is not None:
            with self._cv:
                self.free.append(request.slot)
            request.slot = None

    def _fail(self, request: Request) -> None:
        try:
            request.on_output(TokenOutput(-1, "", "error", completion_tokens=len(request.row.tokens)))
        finally:
            self._release(request)

    def _fail_all(self) -> None:
        for request in list(self.prefilling) + list(self.running.values()):
            self._fail(request)
        self.slots = self._empty_slots()

    def _empty_slots(self) -> dict:
        vocab, rows, k = self.engine.config.vocab_size, self.max_batch, self.engine.num_speculative_tokens
        slots = {"state": self.engine.init_state(rows), "token": jnp.zeros((rows,), jnp.int32),
                 "counts": jnp.zeros((rows, vocab), jnp.int32), "seen": jnp.zeros((rows, vocab), bool),
                 "sampling": batch_arrays([SamplingParams.greedy()] * rows, [0] * rows),
                 "step": jnp.zeros((rows,), jnp.int32), "remaining": jnp.zeros((rows,), jnp.int32),
                 "stop_ids": jnp.full((rows, MAX_STOP_IDS), -1, jnp.int32)}
        if k:
            hidden = (rows, k + 1, self.engine.config.hidden_size)
            slots["carry"] = {"hidden": jnp.zeros(hidden, self.engine.model.dtype),
                              "tokens": jnp.zeros((rows, k + 1), jnp.int32), "n": jnp.zeros((rows,), jnp.int32)}
        return slots
