"""The jitted training and evaluation steps, with their shardings (FSDP + expert + tensor)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from qwen35_jax.loading import resolve_dtype
from qwen35_jax.nn.decoder import add_stats
from qwen35_jax.nn.model import Qwen35
from qwen35_jax.sharding import logical_spec, variable_sharding
from qwen35_jax.vision.multimodal import embed_multimodal
from train.lora import DECODER, LoraSpec, PeriodMerge, adapter_variables, merged_params
from train.loss import cross_entropy_sum, load_balancing_loss, mtp_chain_masks, mtp_targets, router_z_loss
from train.optim import (freeze, frozen_mask, is_variable, learning_rate_schedule, make_optimizer, matrix_mask,
                         plain_values)
from train.vision_data import VISION_BATCH_KEYS

BATCH_KEYS = ("input_ids", "positions", "segment_ids", "targets", "loss_mask")
BATCH_ROWS = BATCH_KEYS + ("vision_index",)  # the fields with a leading batch axis (split over the mesh)


def _keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)


def _flat(tree) -> dict:
    return {_keys(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def vision_embeddings(model, batch: dict) -> jax.Array:
    """The token embeddings [B, L, H] of a vision batch (`train.vision_data`): the encoder (`model.visual`) run
    on the batch's patches, its outputs scattered in at `vision_index`."""
    features = model.visual(batch["pixel_values"], batch["interp_index"], batch["interp_weight"], batch["rope_hw"],
                            batch["vision_segments"])
    index = batch["vision_index"]
    return embed_multimodal(model, batch["input_ids"], jnp.take(features, jnp.maximum(index, 0), axis=0), index >= 0)


def _frozen(model: Qwen35, tc, params) -> dict:
    """The `frozen_mask` of tc.frozen, with the MTP block (params["mtp"]) frozen whole when tc.mtp_loss_weight is 0
    (no loss reaches it: frozen, AdamW's weight decay cannot move it). TrainConfigError: mtp_loss_weight > 0 for a
    model without an MTP block, or nothing left to train."""
    from train.config import TrainConfigError
    mask = frozen_mask(model.config, params, tc.frozen)
    if tc.mtp_loss_weight > 0 and model.mtp is None:
        raise TrainConfigError(f"mtp_loss_weight={tc.mtp_loss_weight}: the model has no MTP block (model_overrides: "
                               "{mtp_num_hidden_layers: 1} for random init, or a checkpoint with mtp.* tensors)",
                               key="mtp_loss_weight")
    if model.mtp is None or tc.mtp_loss_weight > 0:
        return mask
    mask = jax.tree_util.tree_map_with_path(lambda p, m: np.ones_like(m) if _keys(p)[0] == "mtp" else m, mask)
    if all(m.all() for m in jax.tree.leaves(mask)):
        raise TrainConfigError(f"frozen={tc.frozen} freezes everything but the MTP block, which mtp_loss_weight=0 "
                               "keeps frozen too: set mtp_loss_weight > 0 to train it", key="mtp_loss_weight")
    return mask


class Trainer:
    """Training for one model + config: `state = trainer.init_state()`, then
    `state, metrics = trainer.train_step(state, trainer.put_batch(batch))`.

    The state is a dict {"params": the trained arrays as nnx State, "opt_state": optax state, "step": int32
    scalar, "rng": uint32 key data}. A batch is a dict of [batch_size, seq_len] arrays (`train.data`): input_ids,
    positions, segment_ids (0 = padding), targets, loss_mask; with a vision tower (`vision`, a
    `qwen35_jax.vision.encoder.VisionEncoder`, trained beside the text model as `model.visual`: its parameters
    are params["visual"], frozen by `frozen` patterns over its `model.visual.*` names) a batch may be a vision
    batch (`train.vision_data`: [B, 3, L] mRoPE positions and the encoder's inputs).

    Full fine-tuning trains the model's parameters (param_dtype master weights). With `tc.lora` (`train.lora`)
    the state's params are the float32 adapters only (what the optimizer sees and checkpoints hold); the frozen
    base (param_dtype, placed by the rules) stays in the trainer (`self.base`) and is passed to the jitted step
    as an argument, merged with the adapters in the cast.

    The cast (and the LoRA merge) of the decoder's parameters runs per period inside the layer scan (the
    model's period_transform), so only one period's compute-dtype / merged weights are live at a time (under
    remat they are recomputed in the backward pass); the embeddings, final norm and lm_head are cast before.
    """

    def __init__(self, model: Qwen35, tc, mesh: jax.sharding.Mesh | None = None, vision=None):
        if vision is not None:
            if tc.lora is not None:
                from train.config import TrainConfigError
                raise TrainConfigError("lora: training with images or videos (a vision tower) is not supported with "
                                       "LoRA yet; use full fine-tuning, with `frozen` patterns to freeze parts",
                                       key="lora")
            model.visual = vision  # trained beside the text model: its parameters are params["visual"]
        self.config, self.tc, self.mesh = model.config, tc, mesh
        self.graphdef, variables = nnx.split(model)
        self.lora = None if tc.lora is None else LoraSpec.from_config(self.config, tc.lora)
        trained = variables if self.lora is None else adapter_variables(self.lora, tc.seed, abstract=True)
        self.frozen = _frozen(model, tc, plain_values(variables))
        self.tx = make_optimizer(tc, trained, self.frozen if self.lora is None else None)
        self.schedule = learning_rate_schedule(tc)
        self.compute_dtype = resolve_dtype(tc.compute_dtype)
        self.cast_mask = matrix_mask(variables)
        flat_mask = _flat(self.cast_mask)
        self._period_matrix = {p[len(DECODER):]: m for p, m in flat_mask.items() if p[:len(DECODER)] == DECODER}
        self._matrix = flat_mask
        # partly frozen stacked parameters: frozen per slice inside the scan (their masks scanned with the periods)
        self._partly_frozen = tuple(p for p, m in _flat(self.frozen).items()
                                    if p[:len(DECODER)] == DECODER and m.any() and not m.all())
        self._period_merge = None if self.lora is None else PeriodMerge(self.lora, self.config.num_periods)
        coef = tc.router_aux_loss_coef
        self.aux_coef = self.config.router_aux_loss_coef if coef is None else coef
        shardings = lambda tree: None if mesh is None else jax.tree.map(  # noqa: E731
            lambda v: variable_sharding(v, mesh), tree, is_leaf=is_variable)
        self.param_shardings = shardings(trained)
        self._abstract_params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype),
                                             trained, is_leaf=is_variable)
        if self.lora is None:
            self._params, self.base, self.base_shardings = plain_values(variables), None, None
        else:
            self.base_shardings = shardings(variables)
            self.base = plain_values(variables)
            if mesh is not None and not isinstance(jax.tree.leaves(self.base)[0], jax.ShapeDtypeStruct):
                self.base = jax.device_put(self.base, self.base_shardings)
            self._params = None  # the adapters are made by init_state, straight into their shardings
        self._train_step = self._eval_step = None

    # ----- state -----
    def init_state(self, params=None) -> dict:
        """A fresh state (step 0) from `params` (default: a copy of the model's parameters, so the model passed
        in stays usable: training steps donate the state's buffers), placed by the rules."""
        if params is None and self.lora is not None:
            params = self._init_adapters()
        params = jax.tree.map(jnp.copy, self._params) if params is None else params
        if self.mesh is not None:
            params = jax.device_put(params, self.param_shardings)
        opt_state = jax.jit(self.tx.init)(params)
        rng = jax.random.key_data(jax.random.key(self.tc.seed))
        state = {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32), "rng": rng}
        if self.mesh is None:
            return state
        replicated = NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        on_mesh = lambda x: isinstance(x.sharding, NamedSharding) and x.sharding.mesh == self.mesh  # noqa: E731
        return jax.tree.map(lambda x: x if on_mesh(x) else jax.device_put(x, replicated), state)

    def abstract_state(self) -> dict:
        """The state `init_state` builds, as ShapeDtypeStructs with the same shardings and nothing allocated:
        what ahead-of-time compilation of the train step needs (`lower_train_step`, the dry-run)."""
        params = self._abstract_params
        if self.mesh is not None:
            params = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), params,
                                  self.param_shardings)
        opt_state = jax.eval_shape(self.tx.init, params)
        if self.mesh is not None:
            opt_state = jax.tree_util.tree_map_with_path(self._follow_params(params), opt_state)
        scalar = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=None if self.mesh is None  # noqa
                                                          else NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
        rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
        return {"params": params, "opt_state": opt_state, "step": scalar((), jnp.int32),
                "rng": scalar(rng.shape, rng.dtype)}

    def _follow_params(self, params):
        """Optimizer leaves whose path ends with a parameter's path and have its shape (Adam's mu / nu) take its
        sharding, as `jax.jit(tx.init)` places them; the rest (step counts) are replicated."""
        by_path = {tuple(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
        replicated = NamedSharding(self.mesh, jax.sharding.PartitionSpec())

        def place(path, leaf):
            path = tuple(path)
            match = next((by_path[path[i:]] for i in range(len(path)) if path[i:] in by_path), None)
            sharding = match.sharding if match is not None and match.shape == leaf.shape else replicated
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
        return place

    def abstract_batch(self, batch_size: int, seq_len: int) -> dict:
        """A batch of [batch_size, seq_len] ShapeDtypeStructs placed as `put_batch` places real ones."""
        dtypes = {"loss_mask": jnp.float32}
        return {key: jax.ShapeDtypeStruct((batch_size, seq_len), dtypes.get(key, jnp.int32),
                                          sharding=self.batch_sharding((batch_size, seq_len)))
                for key in BATCH_KEYS}

    def lower_train_step(self, state: dict, batch: dict) -> jax.stages.Lowered:
        """The jitted train step lowered for `state` and `batch` (concrete or abstract: `abstract_state`,
        `abstract_batch`); `.compile()` gives what `train_step` runs, with its memory and cost analyses."""
        with self._mesh_context():
            return self._jitted_train_step(state).lower(state, batch, self._abstract(self.base, self.base_shardings))

    def _abstract(self, tree, shardings):
        if tree is None:
            return None
        if shardings is None:
            return jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), tree)
        return jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), tree, shardings)

    def _init_adapters(self):
        """Fresh adapters (B = 0), made by one jitted function straight into their shardings."""
        make = lambda: plain_values(adapter_variables(self.lora, self.tc.seed))  # noqa: E731
        return jax.jit(make, out_shardings=self.param_shardings)()

    def release_params(self):
        """The model's own parameter arrays, forgotten by the trainer: `init_state(trainer.release_params())`
        trains them in place (donated) instead of keeping a copy (what the fine-tuning run does). With LoRA: fresh
        adapters (the base stays in the trainer)."""
        if self.lora is not None:
            return self._init_adapters()
        params, self._params = self._params, None
        return params

    def model(self, params) -> Qwen35:
        """The nnx model holding `params` (e.g. the trained ones, for generation); with LoRA, the base model
        with the adapters `params` merged in (param_dtype)."""
        if self.lora is not None:
            params = merged_params(self.lora, self.base, params)
        return nnx.merge(self.graphdef, params)

    # ----- batches -----
    def batch_sharding(self, shape) -> jax.sharding.Sharding | None:
        if self.mesh is None:
            return None
        return NamedSharding(self.mesh, logical_spec(("batch",) + (None,) * (len(shape) - 1), shape, self.mesh))

    def put_batch(self, batch: dict) -> dict:
        """Host numpy batch -> device arrays, rows split over the mesh's data/fsdp axes. With several processes,
        each passes the whole global batch and contributes the rows its devices hold."""
        out = {}
        for key in BATCH_KEYS + tuple(k for k in VISION_BATCH_KEYS if k in batch):
            value = np.asarray(batch[key])
            sharding = self.batch_sharding(value.shape) if key in BATCH_ROWS else self._replicated()
            if sharding is None:
                out[key] = jnp.asarray(value)
            else:
                out[key] = jax.make_array_from_callback(value.shape, sharding, lambda index, v=value: v[index])
        return out

    def _replicated(self):
        return None if self.mesh is None else NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    # ----- loss -----
    def _cast(self, params, base=None):
        """(the parameters the model is built with, the keyword args of `train_hidden_states` that finish the cast
        inside the layer scan). Matrices go to the compute dtype (master copies stay in params); norms and 1-D
        params stay float32. Frozen parameters and slices are constants to the gradient (zero gradients, not part
        of the grad norm). With LoRA, `params` are the adapters, merged into `base` (`train.lora.PeriodMerge`).
        Parameters outside the decoder's scan are cast here; the decoder's stay as they are (master / base) and
        are cast (merged) one period at a time by the period transform."""
        period_matrix = self._period_matrix
        if self.lora is not None:
            tree, extra = base, self._period_merge.extra(params)
            dtype_of = lambda path, p: self.compute_dtype if period_matrix[path] else p.dtype  # noqa: E731

            def transform(period_params, extra):
                return self._period_merge.merge(plain_values(period_params), extra, dtype_of)
        else:
            partly = set(self._partly_frozen)
            frozen = jax.tree_util.tree_map_with_path(
                lambda p, m: np.zeros_like(m) if _keys(p) in partly else m, self.frozen)
            tree = freeze(params, frozen)
            flat_frozen = _flat(self.frozen)
            extra = tuple(jnp.asarray(flat_frozen[p]) for p in self._partly_frozen)
            masks_at = tuple(p[len(DECODER):] for p in self._partly_frozen)

            def transform(period_params, extra):
                masks = dict(zip(masks_at, extra))

                def one(p, v):
                    path = _keys(p)
                    return jnp.where(masks[path], jax.lax.stop_gradient(v), v) if path in masks else v
                return jax.tree_util.tree_map_with_path(one, plain_values(period_params))
        # Full fine-tuning casts every matrix before the scan (the FSDP all-gathers then move compute-dtype weights:
        # measured 91.7 vs 92.5 GiB per chip for 397B-A17B on a v5p-256 against casting inside the scan); LoRA
        # merges the decoder's weights one period at a time (a whole merged copy would not fit).
        outside = lambda p, v: (v if self.lora is not None and _keys(p)[:len(DECODER)] == DECODER  # noqa: E731
                                else v.astype(self.compute_dtype) if self._matrix[_keys(p)] else v)
        tree = jax.tree_util.tree_map_with_path(outside, tree)
        return tree, {"period_transform": transform, "period_extra": extra}

    def loss_terms(self, params, batch: dict, n_counted, base=None, n_mtp=None) -> tuple[jax.Array, dict]:
        """(objective, metrics) of one (micro-)batch; the cross-entropy term is summed and divided by
        n_counted (all counted tokens of the optimizer step), so micro-batch objectives add up exactly.
        base: the frozen base parameters (LoRA only). n_mtp: the MTP term's count of targets over the optimizer
        step (`train.loss.mtp_targets`), adding tc.mtp_loss_weight x its summed cross-entropy / n_mtp (metrics:
        "mtp_ce_sum"); None: no MTP term."""
        tree, hook = self._cast(params, base)
        model = nnx.merge(self.graphdef, tree)
        positions, embeds = batch["positions"], None
        if "vision_index" in batch:
            positions, embeds = jnp.moveaxis(positions, 1, 0), vision_embeddings(model, batch)
        hidden, stats = model.train_hidden_states(batch["input_ids"], positions, batch["segment_ids"],
                                                  router_stats=self.config.is_moe, remat=self.tc.remat,
                                                  moe_backend=self.tc.moe_backend, embeds=embeds, **hook)
        ce = cross_entropy_sum(hidden, model.logits, batch["targets"], batch["loss_mask"], self.tc.loss_chunk)
        metrics = {"ce_sum": ce}
        objective = ce / n_counted
        if n_mtp is not None:
            metrics["mtp_ce_sum"], mtp_stats = self._mtp_ce_sum(model, hidden, batch, positions, embeds,
                                                                stats is not None)
            objective = objective + self.tc.mtp_loss_weight * metrics["mtp_ce_sum"] / n_mtp
            stats = add_stats(stats, mtp_stats)  # the MTP's MoE layer is balanced with the trunk's (one more layer)
        if stats is not None:
            metrics["aux_loss"] = load_balancing_loss(stats, self.config.num_experts)
            metrics["z_loss"] = router_z_loss(stats)
            objective = objective + (self.aux_coef * metrics["aux_loss"] + self.tc.router_z_loss_coef *
                                     metrics["z_loss"]) / self.tc.grad_accum
        return objective, metrics

    def _mtp_ce_sum(self, model: Qwen35, hidden: jax.Array, batch: dict, positions: jax.Array,
                    embeds: jax.Array | None = None, router_stats: bool = False) -> tuple[jax.Array, dict | None]:
        """The MTP block's summed cross-entropy on token i+2 from (hidden_i, token i+1) (`mtp_targets`): hidden
        [B, L, H] the trunk's final-normed states, positions [B, L] or [3, B, L] (unshifted), the batch's segments;
        embeds: the trunk's input embeddings [B, L, H] of a vision batch (token i+1 enters as its vision feature, as
        in speculative decoding), None: the token embeddings.
        With tc.mtp_draft_steps S > 1, plus steps 2..S: the same targets from the previous step's output at i-1 in
        place of hidden_i (`mtp_chain_masks`), as drafts 2..K of speculative decoding are made.
        Returns (that sum, with router_stats the MTP layer's router stats summed over the steps, each over the
        positions it trains; else None)."""
        targets, segments = mtp_targets(batch)[0], batch["segment_ids"]
        inputs = model.embed(batch["input_ids"]) if embeds is None else embeds
        next_embeds = jnp.pad(inputs[:, 1:], ((0, 0), (0, 1), (0, 0)))
        # a document's first position has no previous output to chain from: zeros, never the previous document's
        continues = jnp.pad(segments[:, 1:] == segments[:, :-1], ((0, 0), (1, 0)))[..., None]
        total, stats = jnp.zeros((), jnp.float32), None
        for mask in mtp_chain_masks(batch, self.tc.mtp_draft_steps):
            out, step_stats = model.mtp.train_forward(hidden, next_embeds, positions, segments,
                                                      mask if router_stats else None, self.tc.moe_backend)
            total = total + cross_entropy_sum(out, model.logits, targets, mask, self.tc.loss_chunk)
            stats = add_stats(stats, step_stats)
            hidden = jnp.where(continues, jnp.pad(out[:, :-1], ((0, 0), (1, 0), (0, 0))), 0).astype(out.dtype)
        return total, stats

    def grads(self, params, batch: dict, base=None) -> tuple[dict, dict]:
        """Gradients of the step objective (mean cross-entropy + router losses + tc.mtp_loss_weight x the MTP
        block's mean cross-entropy) w.r.t. `params`, accumulated over tc.grad_accum micro-batches (base: the frozen
        base, LoRA only). Returns (grads, metrics: "loss", "tokens", "mtp_loss" and "mtp_tokens" when the MTP term
        is on, the router losses)."""
        accum = self.tc.grad_accum
        n_counted = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        n_mtp = None
        if self.tc.mtp_loss_weight > 0:
            n_mtp = jnp.maximum(sum(jnp.sum(m) for m in mtp_chain_masks(batch, self.tc.mtp_draft_steps)), 1.0)
        micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
        grad_fn = jax.grad(self.loss_terms, has_aux=True)

        def body(carry, mb):
            grads, sums = carry
            g, metrics = grad_fn(params, mb, n_counted, base, n_mtp)
            return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, metrics)), None

        zero_metrics = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), n_counted, base,
                                                      n_mtp)[1])
        init = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_metrics))
        if accum == 1:
            (grads, sums), _ = body(init, jax.tree.map(lambda x: x[0], micro))
        else:
            (grads, sums), _ = jax.lax.scan(body, init, micro)
        metrics = {"loss": sums.pop("ce_sum") / n_counted, "tokens": n_counted}
        if n_mtp is not None:
            metrics.update(mtp_loss=sums.pop("mtp_ce_sum") / n_mtp, mtp_tokens=n_mtp)
        metrics.update({k: v / accum for k, v in sums.items()})
        return grads, metrics

    # ----- steps -----
    def _step(self, state: dict, batch: dict, base=None) -> tuple[dict, dict]:
        grads, metrics = self.grads(state["params"], batch, base)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["lr"] = self.schedule(state["step"])
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        new_state = {"params": keep(params, state["params"]), "opt_state": keep(opt_state, state["opt_state"]),
                     "step": state["step"] + finite.astype(jnp.int32), "rng": state["rng"]}
        return new_state, metrics

    def train_step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        """One optimizer step (jitted, the state donated). A non-finite loss or gradient leaves the state
        unchanged (the caller stops the run: metrics["loss"] is not finite)."""
        with self._mesh_context():
            return self._jitted_train_step(state)(state, batch, self.base)

    def _jitted_train_step(self, state: dict):
        if self._train_step is None:
            shardings = None if self.mesh is None else jax.tree.map(lambda x: x.sharding, state)
            self._train_step = jax.jit(self._step, donate_argnums=0,
                                       out_shardings=None if shardings is None else (shardings, None))
        return self._train_step

    def eval_step(self, params, batch: dict) -> dict:
        """{"ce_sum", "tokens"} of a batch (no gradients)."""
        def run(params, batch, base):
            n = jnp.sum(batch["loss_mask"])
            _, metrics = self.loss_terms(params, batch, 1.0, base)
            return {"ce_sum": metrics["ce_sum"], "tokens": n}
        if self._eval_step is None:
            self._eval_step = jax.jit(run)
        with self._mesh_context():
            return self._eval_step(params, batch, self.base)

    def _mesh_context(self):
        import contextlib
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)
