"""The generation engine: chunked prefill and a jitted, donated decode step over a static decode state.

    engine = Engine.load("path/to/checkpoint", dtype="float32", max_len=4096)
    results = engine.generate(["Hello", [1, 2, 3]], SamplingParams.greedy(max_new_tokens=32))
    results = engine.generate([engine.vision_prompt(messages=[{"role": "user", "content": [
        {"type": "image", "image": "cat.png"}, {"type": "text", "text": "What is this?"}]}])])
    for event in engine.stream(["Hello"], params): print(event.text, end="")
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infer.sampling import SamplingParams, batch_arrays, sample
from infer.speculative import check_speculative, last_emitted, speculative_step
from qwen35_jax.cache import abstract_decode_state, decode_state_shardings, init_decode_state
from qwen35_jax.checkpoint.orbax_io import ASSETS
from qwen35_jax.loading import load_model, load_vision_tower
from qwen35_jax.nn.model import state_max_len, unstack_layers
from qwen35_jax.tokenizer import IncrementalDecoder, Tokenizer
from qwen35_jax.vision.chat import vision_chat_prompt, vision_text_prompt
from qwen35_jax.vision.multimodal import (VisionPrompt, check_placeholders, embed_multimodal, feature_index,
                                          gather_features, prompt_positions, vision_features)
from qwen35_jax.vision.processing import ImageProcessorConfig, VideoProcessorConfig, processor_configs


@dataclasses.dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str            # "stop" (EOS, stop token or stop string) or "length"
    tokens_per_second: float = 0.0
    mean_acceptance_length: float | None = None  # speculative decoding: tokens per verify step (drafts + 1)


@dataclasses.dataclass
class StreamEvent:
    index: int                    # which prompt
    text: str                     # the new text (may be "" while a multi-byte character is incomplete)
    token_id: int | None
    finish_reason: str | None = None
    mean_acceptance_length: float | None = None  # speculative decoding, on the row's last event


def _bucket(n: int, cap: int) -> int:
    """Smallest power of two >= n (at least 16), capped: few prefill shapes, so few compiles."""
    return min(cap, max(16, 1 << (n - 1).bit_length()))


def prefill_chunks(start: int, end: int, chunk: int) -> list[tuple[int, int]]:
    """(offset, width) of the prefill calls for tokens [start, end): offsets step by `chunk` from `start` (0 or a
    multiple of `chunk`), each call `_bucket(end - offset, chunk)` wide. Full chunks always end on multiples of
    `chunk`, so a prefill resumed from a state saved at such a boundary makes exactly the calls (same shapes, same
    inputs) that the uninterrupted prefill makes from there: the prefix cache's results are bit-identical."""
    return [(offset, _bucket(end - offset, chunk)) for offset in range(start, end, chunk)]


class Engine:
    def __init__(self, model, tokenizer: Tokenizer | None = None, max_len: int = 4096, prefill_chunk: int = 512,
                 mesh: jax.sharding.Mesh | None = None, moe_backend: str = "auto", vision=None,
                 num_speculative_tokens: int = 0):
        if max_len < 2 or prefill_chunk < 1:
            raise ValueError(f"max_len={max_len} must be >= 2 and prefill_chunk={prefill_chunk} >= 1")
        check_speculative(model, num_speculative_tokens)
        self.num_speculative_tokens = num_speculative_tokens  # K MTP drafts per step (0: plain decoding)
        model = unstack_layers(model)  # decoding reads unstacked layers (see nn.decoder.Decoder)
        self.model, self.tokenizer = model, tokenizer
        self.vision = vision  # qwen35_jax.vision.encoder.VisionEncoder (None: text prompts only)
        self.image_processor, self.video_processor = ImageProcessorConfig(), VideoProcessorConfig()
        self.config = model.config
        self.max_len, self.prefill_chunk = max_len, prefill_chunk
        self.graphdef, state = nnx.split(model)
        # the jitted steps take the weights as a plain nested dict: flattening it per call costs ~20 us on the
        # host, an nnx.State ~120 us (a tenth of a small model's decode step); nnx.merge takes either
        self.params = nnx.to_pure_dict(state)
        self.decode_traces = self.prefill_traces = 0  # how many times each step was traced (compiled)
        self.mesh, self.moe_backend = mesh, moe_backend  # moe_backend: ops.moe.MOE_BACKENDS
        self._prefill_jit = jax.jit(self._prefill_fn, donate_argnums=(1,))
        self._decode_jit = jax.jit(self._decode_fn, donate_argnums=(1, 3, 4))
        self._prefill, self._decode = self._in_mesh(self._prefill_jit), self._in_mesh(self._decode_jit)
        self._first_sample_jit = jax.jit(self._sample_and_count)
        self._first_sample = self._in_mesh(self._first_sample_jit)
        self._speculate = self._in_mesh(jax.jit(self._speculative_fn, donate_argnums=(1, 3, 4, 5)))
        self._copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))
        self.last_state = None

    @classmethod
    def abstract(cls, cfg, mesh=None, dtype=jnp.bfloat16, max_len: int = 4096, prefill_chunk: int = 512,
                 moe_backend: str = "auto") -> Engine:
        """An engine over a model of ShapeDtypeStructs placed by the sharding rules (nothing allocated): its
        `lower_prefill` / `lower_decode` compile the engine's own steps for any model size (the dry-run)."""
        import dataclasses

        from qwen35_jax.nn.model import Qwen35
        from qwen35_jax.sharding import variable_sharding
        model = Qwen35.abstract(dataclasses.replace(cfg, scan_layers=False), dtype)
        if mesh is not None:
            graphdef, state = nnx.split(model)
            state = jax.tree.map(lambda v: v.replace(jax.ShapeDtypeStruct(
                v.get_value().shape, v.get_value().dtype, sharding=variable_sharding(v, mesh))), state,
                is_leaf=lambda x: isinstance(x, nnx.Variable))
            model = nnx.merge(graphdef, state)
        return cls(model, None, max_len=max_len, prefill_chunk=prefill_chunk, mesh=mesh, moe_backend=moe_backend)

    def init_state(self, batch: int) -> dict:
        """An empty decode state for `batch` rows, sharded like its batch and heads on the engine's mesh
        (`qwen35_jax.cache.decode_state_shardings`). With speculative decoding it holds the MTP block's cache
        too, and K more cache entries than max_len (a verify step writes K+1 before acceptance)."""
        k = self.num_speculative_tokens
        return init_decode_state(self.config, batch, self.max_len + k, self.model.dtype, mesh=self.mesh, mtp=k > 0)

    def lower_prefill(self, batch: int, chunk: int | None = None) -> jax.stages.Lowered:
        """The prefill step (one chunk of `chunk` tokens per row; default prefill_chunk) lowered for abstract
        arguments placed as `stream` places them."""
        chunk = chunk or self.prefill_chunk
        tokens = self._abstract((batch, chunk), jnp.int32)
        with self._mesh_context():
            return self._prefill_jit.lower(self.params, self._abstract_state(batch), tokens,
                                           self._abstract((batch,), jnp.int32))

    def lower_decode(self, batch: int) -> jax.stages.Lowered:
        """The one-token decode step (forward + sampling) lowered for abstract arguments, as `stream` runs it."""
        vocab = self.config.vocab_size
        sampling = jax.eval_shape(lambda: batch_arrays([SamplingParams()] * batch, [0] * batch))
        sampling = jax.tree.map(lambda s: self._abstract(s.shape, s.dtype), sampling)
        with self._mesh_context():
            return self._decode_jit.lower(
                self.params, self._abstract_state(batch), self._abstract((batch,), jnp.int32),
                self._abstract((batch, vocab), jnp.int32), self._abstract((batch, vocab), jnp.bool_),
                self._abstract((batch,), jnp.int32), sampling, 1)

    def _abstract_state(self, batch: int) -> dict:
        return abstract_decode_state(self.config, batch, self.max_len, self.model.dtype, self.mesh)

    def _abstract(self, shape, dtype) -> jax.ShapeDtypeStruct:
        """A [batch, ...] argument, rows split by the batch rule on the engine's mesh."""
        if self.mesh is None:
            return jax.ShapeDtypeStruct(shape, dtype)
        from jax.sharding import NamedSharding

        from qwen35_jax.sharding import logical_spec
        spec = logical_spec(("batch",) + (None,) * (len(shape) - 1), shape, self.mesh)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(self.mesh, spec))

    def _mesh_context(self):
        import contextlib
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    @classmethod
    def load(cls, path: str | Path, dtype="float32", max_len: int = 4096, mesh=None, prefill_chunk: int = 512,
             tokenizer: Tokenizer | str | Path | None = None, compute_dtype=None,
             num_speculative_tokens: int = 0) -> Engine:
        """Loads a checkpoint folder (and its tokenizer, when the folder has one).

        dtype / compute_dtype as in `load_model`: on CPU a bfloat16 load computes (and keeps its decode state)
        in float32 unless compute_dtype="bfloat16". With a mesh, parameters are sharded by the rules of
        qwen35_jax.sharding, the MoE runs expert-parallel under shard_map, and XLA inserts the other
        collectives; the decode state is sharded like its batch and heads (`init_state`).
        num_speculative_tokens: K in 0..4, MTP drafts verified per decode step (`infer.speculative`; needs a
        checkpoint with mtp.* tensors; 0 = plain decoding)."""
        model = load_model(path, dtype=dtype, mesh=mesh, scan_layers=False, compute_dtype=compute_dtype)
        vision = load_vision_tower(path, dtype=dtype, mesh=mesh, compute_dtype=compute_dtype)
        if tokenizer is None:  # an HF folder holds its tokenizer; a converted checkpoint keeps it in assets/
            tokenizer = next((Tokenizer.load(d) for d in (Path(path), Path(path) / ASSETS)
                              if any((d / f).exists() for f in ("tokenizer.json", "tokenizer.model"))), None)
        elif isinstance(tokenizer, (str, Path)):
            tokenizer = Tokenizer.load(tokenizer)
        engine = cls(model, tokenizer, max_len=max_len, prefill_chunk=prefill_chunk, mesh=mesh, vision=vision,
                     num_speculative_tokens=num_speculative_tokens)
        engine.image_processor, engine.video_processor = processor_configs(path, Path(path) / ASSETS)
        return engine

    def vision_prompt(self, text: str = "", images=(), videos=(), messages: list[dict] | None = None,
                      video_fps: float | None = None, **template_kwargs) -> VisionPrompt:
        """A prompt with images and videos for `generate` / `stream`, processed with the checkpoint's processor
        configs: from chat `messages` (contents with text / image / image_url / video parts, rendered by the
        chat template with `template_kwargs`), or else the images and videos (paths, PIL images, arrays)
        placed before the plain `text` (`qwen35_jax.vision.chat`)."""
        if self.tokenizer is None or self.config.vision is None:
            raise ValueError("image and video prompts need a tokenizer and a model with a vision tower")
        if messages is not None:
            return vision_chat_prompt(self.tokenizer, messages, self.config.vision, self.image_processor,
                                      self.video_processor, **template_kwargs)
        return vision_text_prompt(self.tokenizer, text, self.config.vision, images, videos, self.image_processor,
                                  self.video_processor, video_fps)

    # ---- jitted steps --------------------------------------------------------------------------
    def _in_mesh(self, fn):
        """Traces and runs `fn` with the mesh in context (the MoE then runs expert-parallel)."""
        if self.mesh is None:
            return fn

        def run(*args):
            with jax.set_mesh(self.mesh):
                return fn(*args)
        return run

    def _prefill_fn(self, params, state, tokens, n_valid, vision=None, mtp_next=None):
        """tokens [B, C] right-padded per row (n_valid [B]) -> (logits at each row's last valid token, state, and
        with mtp_next its final-normed hidden state [B, H]).

        mtp_next (speculative decoding, `mtp_next_inputs`): (the tokens that follow each position [B, C], how many
        of them are known [B]) and, with vision, (their vision rows [B, C, H], mask [B, C]): the MTP block's cache
        advances over those positions (the prompt's last waits for the first sampled token), at the main model's
        positions (mRoPE with vision), a following image or video token entering as its vision feature.

        vision (multimodal prompts, `_VisionRows.chunk`): (positions int [3, B, C] mRoPE, vision rows [B, C, H]
        and their mask bool [B, C] (the token's vision feature in place of its embedding), rope_deltas int [B]
        stored for decoding). Its shapes depend on the chunk only: one compile per chunk width."""
        self.prefill_traces += 1
        model = nnx.merge(self.graphdef, params)
        embeds = positions = None
        if vision is not None:
            positions, rows, mask, rope_deltas = vision
            embeds = embed_multimodal(model, tokens, rows, mask)
            state = {**state, "rope_deltas": rope_deltas}
        hidden, state = model.forward_with_state(tokens, state, n_valid, moe_backend=self.moe_backend,
                                                 embeds=embeds, positions=positions)
        last = jnp.take_along_axis(hidden, jnp.maximum(n_valid - 1, 0)[:, None, None], axis=1)[:, 0]
        if mtp_next is None:
            return model.logits(last).astype(jnp.float32), self._placed(state)
        next_tokens, known, *next_vision = mtp_next
        next_embeds = embed_multimodal(model, next_tokens, *next_vision) if next_vision else model.embed(next_tokens)
        start = {**state["mtp"], "lengths": state["lengths"] - n_valid}  # aligned with the chunk (a continued
        _, state = model.mtp.forward_with_state(hidden, next_embeds, {**state, "mtp": start}, known,
                                                positions=positions, moe_backend=self.moe_backend)
        return model.logits(last).astype(jnp.float32), self._placed(state), last

    def _speculative_fn(self, params, state, pending, carry, counts, seen, sampling, step, limit, stop_ids):
        """One speculative step (`infer.speculative.speculative_step`; state, carry, counts, seen donated), its
        outputs and the new pending token per row [B] (the last emitted one; as it was for a finished row)."""
        self.decode_traces += 1
        model = nnx.merge(self.graphdef, params)
        out = speculative_step(model, state, pending, carry, counts, seen, sampling, step, limit, stop_ids,
                               self.num_speculative_tokens, self.moe_backend)
        return out[:3] + (self._placed(out[3]),) + out[4:] + (last_emitted(out[0], out[1], pending),)

    def _decode_fn(self, params, state, tokens, counts, seen, n_valid, sampling, step):
        """One token per row: forward, then sample. tokens [B]; counts, seen [B, V] (donated)."""
        self.decode_traces += 1
        model = nnx.merge(self.graphdef, params)
        hidden, state = model.forward_with_state(tokens[:, None], state, n_valid, moe_backend=self.moe_backend)
        state = self._placed(state)
        logits = model.logits(hidden[:, 0]).astype(jnp.float32)
        return self._sample_and_count(logits, counts, seen, sampling, step) + (state,)

    def _placed(self, state: dict) -> dict:
        """The new decode state pinned to the placement `init_state` gives it (so it stays sharded, step after
        step, whatever XLA would propagate)."""
        if self.mesh is None:
            return state
        shardings = decode_state_shardings(self.config, state["lengths"].shape[0], state_max_len(state),
                                           jnp.float32, self.mesh, mtp="mtp" in state)
        return jax.lax.with_sharding_constraint(state, shardings)

    @staticmethod
    def _sample_and_count(logits, counts, seen, sampling, step):
        token = sample(logits, counts, seen, sampling, step)
        rows = jnp.arange(token.shape[0])
        return token, counts.at[rows, token].add(1), seen.at[rows, token].set(True)

    # ---- user API ------------------------------------------------------------------------------
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 state: dict | None = None) -> list[GenerationResult]:
        """One result per prompt (strings need a tokenizer; token-id lists work without one; a
        `qwen35_jax.vision.multimodal.VisionPrompt` carries images and videos, see `vision.chat`).

        `tokens_per_second` is generated tokens over the wall time of the whole call (prefill included).
        """
        prompt_ids = [self._prompt_ids(p) for p in prompts]
        tokens, texts, reasons = [[] for _ in prompts], [""] * len(prompts), [None] * len(prompts)
        acceptance = [None] * len(prompts)
        start = time.perf_counter()
        for event in self.stream(prompt_ids, params, state=state):
            tokens[event.index].append(event.token_id)
            texts[event.index] += event.text
            reasons[event.index] = event.finish_reason
            acceptance[event.index] = event.mean_acceptance_length
        elapsed = max(time.perf_counter() - start, 1e-9)
        return [GenerationResult(_token_ids(p), t, x, r, len(t) / elapsed, a)
                for p, t, x, r, a in zip(prompt_ids, tokens, texts, reasons, acceptance)]

    def stream(self, prompts, params=None, state: dict | None = None) -> Iterator[StreamEvent]:
        """Yields a StreamEvent per generated token; text deltas never split a multi-byte character.

        `state`: a decode state from an earlier call (`engine.last_state`, for chat turns) that the prompts
        continue; it is consumed (its buffers are donated). `engine.last_state` always holds the current
        state: every token fed so far (all but the last sampled token of each row), even if the stream is
        abandoned early. Repetition penalties see the tokens of this call only.
        """
        prompt_ids = [self._prompt_ids(p) for p in prompts]
        batch = len(prompt_ids)
        params = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * batch
        if len(params) != batch:
            raise ValueError(f"got {len(params)} SamplingParams for {batch} prompts")
        if state is None:
            state = self.init_state(batch)
        start_lengths = np.asarray(state["lengths"])
        if start_lengths.shape != (batch,):
            raise ValueError(f"the decode state holds {start_lengths.shape[0]} rows but {batch} prompts were given")
        for i, ids in enumerate(prompt_ids):
            if start_lengths[i] + len(ids) > self.max_len:
                raise ValueError(f"prompt {i} has {len(ids)} tokens; with {start_lengths[i]} already in the state "
                                 f"that exceeds max_len={self.max_len}")
        seeds = [p.seed if p.seed is not None else np.random.SeedSequence().entropy % (2**31) for p in params]
        sampling = batch_arrays(params, seeds)
        logits, state, last_hidden = self._run_prefill(prompt_ids, state)
        self.last_state = state
        vocab = self.config.vocab_size
        seen = np.zeros((batch, vocab), bool)
        for i, ids in enumerate(prompt_ids):
            seen[i, _token_ids(ids)] = True
        counts, seen = jnp.zeros((batch, vocab), jnp.int32), jnp.asarray(seen)
        token, counts, seen = self._first_sample(logits, counts, seen, sampling, 0)
        if self.num_speculative_tokens:
            yield from self._speculative_loop(params, state, token, last_hidden, counts, seen, sampling)
        else:
            yield from self._decode_loop(params, state, token, counts, seen, sampling)

    def _eos(self, params: SamplingParams) -> tuple[int, ...]:
        return () if params.ignore_eos or self.tokenizer is None else self.tokenizer.eos_token_ids

    def _decode_loop(self, params, state, token, counts, seen, sampling):
        rows = [_Row(p, self.tokenizer) for p in params]
        lengths = np.asarray(state["lengths"]).copy()
        for step in range(1, max(p.max_new_tokens for p in params) + 1):
            token_host = np.asarray(token)
            for i, row in enumerate(rows):
                if row.finish is None:
                    text = row.accept(int(token_host[i]), self._eos(row.params), lengths[i] >= self.max_len)
                    yield StreamEvent(i, text, int(token_host[i]), row.finish)
            if all(row.finish is not None for row in rows):
                break
            active = np.array([row.finish is None for row in rows], np.int32)
            lengths += active
            token, counts, seen, state = self._decode(self.params, state, token, counts, seen, active, sampling,
                                                      np.int32(step))  # numpy in: no per-step jnp dispatch
            self.last_state = state

    def _speculative_loop(self, params, state, token, last_hidden, counts, seen, sampling):
        """Decoding K MTP drafts per step (`infer.speculative`): each step emits 1..K+1 tokens per row, the
        tokens plain decoding would give (greedy) or draws from the same distribution (sampled)."""
        rows = [_Row(p, self.tokenizer) for p in params]
        k, batch = self.num_speculative_tokens, len(rows)
        lengths = np.asarray(state["lengths"]).copy()
        stop_ids = jnp.asarray(_stop_table([self._eos(p) + p.stop_token_ids for p in params]))
        hidden = jnp.zeros((batch, k + 1, last_hidden.shape[-1]), last_hidden.dtype).at[:, 0].set(last_hidden)
        carry = {"hidden": hidden, "tokens": jnp.zeros((batch, k + 1), jnp.int32).at[:, 0].set(token),
                 "n": jnp.ones((batch,), jnp.int32)}
        fed, steps = np.zeros(batch, np.int64), np.zeros(batch, np.int64)
        tokens, emitted, pending = np.asarray(token)[:, None], np.ones(batch, np.int64), token
        before = lengths - 1  # emitted token m is accepted with before + m + 1 tokens in the state
        # a stop string (host side) may end a row inside a step: with stop strings each step's inputs are kept, so
        # that the step can be redone with that row's limit cut to the tokens it took (the same step, the same
        # tokens: its state then holds what plain decoding's would)
        kept = None
        for step in range(1, max(p.max_new_tokens for p in params) + 1):
            taken = emitted.copy()
            for i, row in enumerate(rows):
                for m in range(int(emitted[i]) if row.finish is None else 0):
                    text = row.accept(int(tokens[i, m]), self._eos(row.params), before[i] + m + 1 >= self.max_len)
                    mean = fed[i] / steps[i] if row.finish is not None and steps[i] else None
                    yield StreamEvent(i, text, int(tokens[i, m]), row.finish, mean)
                    if row.finish is not None:
                        taken[i] = m + 1
                        break
            if kept is not None and np.any(taken < emitted):
                inputs, limit = kept
                out = self._speculate(self.params, *inputs, sampling, np.int32(step - 1), np.minimum(limit, taken),
                                      stop_ids)
                _, _, _, state, carry, counts, seen, pending = out
                self.last_state = state
            if all(row.finish is not None for row in rows):
                break
            limit = np.array([0 if row.finish is not None else
                              min(row.params.max_new_tokens - len(row.tokens), self.max_len - lengths[i])
                              for i, row in enumerate(rows)], np.int32)
            if any(p.stop for p in params):
                kept = self._copy((state, pending, carry, counts, seen)), limit
            out = self._speculate(self.params, state, pending, carry, counts, seen, sampling, np.int32(step), limit,
                                  stop_ids)  # numpy in: no per-step jnp dispatch
            tokens, emitted, _, state, carry, counts, seen, pending = out
            self.last_state = state
            tokens, emitted = np.asarray(tokens), np.asarray(emitted)
            before = lengths.copy()
            lengths += emitted
            fed += emitted
            steps += limit > 0

    def _run_prefill(self, prompts, state):
        """Chunked prefill of every row; returns (logits [B, V] after each row's prompt, state, and with
        speculative decoding the final-normed hidden state [B, H] there, else None). prompts: token-id lists and
        `VisionPrompt`s (those rows get their vision features and mRoPE positions)."""
        prompt_ids = [_token_ids(p) for p in prompts]
        batch = len(prompt_ids)
        longest = max(len(ids) for ids in prompt_ids)
        vision = self._vision_inputs(prompts, state)
        logits = hidden = None
        for offset, chunk in prefill_chunks(0, longest, self.prefill_chunk):
            tokens = np.zeros((batch, chunk), np.int32)
            n_valid = np.zeros(batch, np.int32)
            for i, ids in enumerate(prompt_ids):
                piece = ids[offset:offset + chunk]
                tokens[i, :len(piece)] = piece
                n_valid[i] = len(piece)
            extra = () if vision is None else (vision.chunk(offset, chunk),)
            if self.num_speculative_tokens:
                extra = (extra or (None,)) + (mtp_next_inputs(prompt_ids, offset, chunk, vision),)
            out = self._prefill(self.params, state, jnp.asarray(tokens), jnp.asarray(n_valid), *extra)
            ends_here = jnp.asarray((n_valid > 0) & (offset + n_valid == np.array([len(p) for p in prompt_ids])))
            logits = out[0] if logits is None else jnp.where(ends_here[:, None], out[0], logits)
            state = out[1]
            if self.num_speculative_tokens:
                hidden = out[2] if hidden is None else jnp.where(ends_here[:, None], out[2], hidden)
        return logits, state, hidden

    def _vision_inputs(self, prompts, state) -> _VisionRows | None:
        """The host-side vision inputs of a batch holding at least one VisionPrompt with images or videos
        (each prompt's encoder run once), else None."""
        if not any(isinstance(p, VisionPrompt) and (p.images or p.videos) for p in prompts):
            return None
        if self.vision is None:
            raise ValueError("a prompt has images or videos but this engine has no vision encoder (load a "
                             "checkpoint with a vision tower: model.visual.* tensors)")
        return _VisionRows(prompts, self.vision, self.config.vision, np.asarray(state["lengths"]),
                           np.asarray(state["rope_deltas"]))

    def _prompt_ids(self, prompt) -> list[int] | VisionPrompt:
        """Token ids of a prompt (a string, token ids, or a VisionPrompt, returned as it is once checked)."""
        if isinstance(prompt, VisionPrompt):
            if self.config.vision is None:
                raise ValueError("a VisionPrompt needs a model with a vision config")
            if (prompt.images or prompt.videos) and self.vision is None:
                raise ValueError("a prompt has images or videos but this engine has no vision encoder (load a "
                                 "checkpoint with a vision tower: model.visual.* tensors)")
            check_placeholders(prompt, self.config.vision)
            ids = prompt.token_ids
        elif isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer: load a folder with tokenizer.json or pass "
                                 "token-id lists")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt: expected at least one token")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
        return prompt if isinstance(prompt, VisionPrompt) else ids


def mtp_next_inputs(prompt_ids: list[list[int]], offset: int, width: int, vision: _VisionRows | None) -> tuple:
    """The MTP inputs of a speculative prefill chunk of `width` at `offset` (`Engine._prefill_fn`'s mtp_next):
    (the token after each position [B, width], how many of them are known [B]: the prompt's last position waits
    for the first sampled token), and with vision (the vision rows [B, width, H] and mask [B, width] of those
    following tokens), device arrays."""
    following = np.zeros((len(prompt_ids), width), np.int32)
    for i, ids in enumerate(prompt_ids):
        after = ids[offset + 1:offset + width + 1]
        following[i, :len(after)] = after
    lengths = np.array([len(ids) for ids in prompt_ids])
    known = np.clip(lengths - offset - 1, 0, width).astype(np.int32)
    out = (jax.device_put(following), jax.device_put(known))
    return out if vision is None else out + vision.chunk(offset + 1, width)[1:3]


def _stop_table(stops: list[tuple[int, ...]]) -> np.ndarray:
    """int32 [B, S] of each row's stop token ids, -1 padded; S a power of two (few compiles)."""
    width = 1 << max(3, (max(len(s) for s in stops) - 1).bit_length())
    table = np.full((len(stops), width), -1, np.int32)
    for i, ids in enumerate(stops):
        table[i, :len(ids)] = ids
    return table


def _token_ids(prompt) -> list[int]:
    """The token ids of a checked prompt (a token-id list or a VisionPrompt)."""
    return list(prompt.token_ids) if isinstance(prompt, VisionPrompt) else prompt


class _VisionRows:
    """A batch's vision inputs on the host: per row, the mRoPE positions continuing the row's state (its length
    plus its rope delta), its vision features aligned with its tokens (each request's encoder run once), and
    the rope delta decoding continues with."""

    def __init__(self, prompts, encoder, vcfg, lengths: np.ndarray, deltas: np.ndarray):
        longest = max(len(p) for p in prompts)
        self.positions = np.zeros((3, len(prompts), longest), np.int32)
        self.rows = np.zeros((len(prompts), longest, 0), np.float32)
        self.mask = np.zeros((len(prompts), longest), bool)
        self.rope_deltas = deltas.astype(np.int32).copy()
        for i, prompt in enumerate(prompts):
            start = int(lengths[i] + deltas[i])
            if isinstance(prompt, VisionPrompt):
                positions, delta = prompt_positions(prompt, vcfg)
                features = vision_features(encoder, prompt)
                if features is not None:
                    if not self.rows.shape[2]:
                        self.rows = np.zeros((len(prompts), longest, features.shape[1]), np.float32)
                    self.rows[i, :len(prompt)], self.mask[i, :len(prompt)] = gather_features(
                        features, feature_index(prompt, vcfg))
                self.rope_deltas[i] += delta
            else:
                positions = np.broadcast_to(np.arange(len(prompt), dtype=np.int32), (3, len(prompt)))
            self.positions[:, i, :len(prompt)] = positions + start

    def chunk(self, offset: int, width: int) -> tuple:
        """(positions [3, B, width], vision rows [B, width, H], mask [B, width], rope_deltas [B]) of the chunk at
        `offset` (`Engine._prefill_fn`'s vision argument), zero-padded past each row's prompt."""
        end = min(offset + width, self.mask.shape[1])
        positions = np.zeros(self.positions.shape[:2] + (width,), np.int32)
        rows = np.zeros(self.rows.shape[:1] + (width,) + self.rows.shape[2:], np.float32)
        mask = np.zeros((self.mask.shape[0], width), bool)
        positions[:, :, :end - offset] = self.positions[:, :, offset:end]
        rows[:, :end - offset] = self.rows[:, offset:end]
        mask[:, :end - offset] = self.mask[:, offset:end]
        return tuple(jax.device_put(x) for x in (positions, rows, mask, self.rope_deltas))


class _Row:
    """One request's tokens and text during decoding: EOS / stop tokens / stop strings / length.

    With stop strings, the last (longest stop string - 1) characters are held back until they can no
    longer begin a stop string, so streamed text never includes any part of one."""

    def __init__(self, params: SamplingParams, tokenizer: Tokenizer | None):
        self.params = params
        self.decoder = IncrementalDecoder(tokenizer) if tokenizer is not None else None
        self.tokens: list[int] = []
        self.text, self.emitted = "", 0
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.finish: str | None = None

    def accept(self, token: int, eos: tuple[int, ...], cache_full: bool) -> str:
        """Adds a sampled token; returns the text that may be shown now (sets self.finish when done)."""
        self.tokens.append(token)
        if token in self.params.stop_token_ids or token in eos:
            self.finish = "stop"
        elif self.decoder is not None:
            self.text += self.decoder.push(token)
            cut = min((c for c in (self.text.find(s, max(0, self.emitted - self.holdback))
                                   for s in self.params.stop) if c >= 0), default=-1)
            if cut >= 0:
                self.text, self.finish = self.text[:cut], "stop"
                return self._emit(cut)
        if self.finish is None and (len(self.tokens) >= self.params.max_new_tokens or cache_full):
            self.finish = "length"
        if self.finish is not None:
            self.text += self.decoder.flush() if self.decoder is not None else ""
            return self._emit(len(self.text))
        return self._emit(len(self.text) - self.holdback)

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        delta, self.emitted = self.text[self.emitted:upto], upto
        return delta
