"""Vision throughput: encoder images/s and multimodal prefill tokens/s, ours vs HF transformers, same weights, same run.

    python -m benchmarks.vision [--config small-moe] [--images 2] [--image-size 448] [--text-len 128]
        [--repeats 5] [--vision-depth 4] [--vision-hidden 256] [--vision-heads 4] [--vision-intermediate 512]
        [--torch-threads N] [--json]

A seeded random HF `Qwen3_5(Moe)ForConditionalGeneration` (the text model of --config plus a vision tower of the
--vision-* sizes, out_hidden = the text hidden size) is saved to a temporary folder and loaded into ours, so both
sides run identical float32 weights. `--images` random RGB images of --image-size pixels go through the real
processor (448 px -> 28x28 patches -> 196 tokens each); its output feeds both sides and is not timed.

1. vision encoder, images/s: ours `VisionEncoder.encode` (per image: host-side geometry + padding to its patch
   bucket + the jitted tower, the result back on the host) vs HF `model.model.visual(pixel_values, grid_thw)`.
2. multimodal prefill, tokens/s (prompt length / time): a prompt of --text-len text tokens around the images'
   placeholder runs. Ours: mRoPE positions and feature index (host) + `vision_features` (the encoder; features
   come back to the host, as `multimodal_logits` has them) + one jitted function (token embeddings with the
   image features in place, text model, last-token logits); HF: the model's forward with pixel_values,
   image_grid_thw, mm_token_type_ids, logits_to_keep=1, use_cache=False. Neither side builds a decode state.

Each figure is the median of --repeats timed runs after one untimed warmup (ours: the warmup compiles); HF and
ours are timed in turns, one run of each per round, so that both see the same load of a shared machine. The last
line compares the two sides' last-token logits of the prefill (same weights, so they should agree closely).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from benchmarks.common import add_config_arguments, median_seconds, print_table
from qwen35_jax.hf_reference import TINY_VISION_TOKENS, build_hf_multimodal, save_hf_model
from qwen35_jax.loading import load_model, load_vision_tower
from qwen35_jax.vision.encoder import patch_bucket
from qwen35_jax.vision.multimodal import (VisionPrompt, embed_multimodal, feature_index, gather_features,
                                          prompt_positions, vision_features)
from qwen35_jax.vision.processing import ProcessedVision, process_images

VS, VE, IMG = (TINY_VISION_TOKENS[k] for k in ("vision_start_token_id", "vision_end_token_id", "image_token_id"))


def random_images(count: int, size: int, seed: int) -> ProcessedVision:
    """`count` random size x size RGB images through the real image processor."""
    rng = np.random.default_rng(seed)
    return process_images([rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)])


def build_prompt(images: ProcessedVision, text_len: int, merge: int, seed: int) -> VisionPrompt:
    """Half the text, then each image as <|vision_start|> + its placeholder run + <|vision_end|>, then the rest.
    Text tokens are drawn below the multimodal special ids (inside even a tiny preset's vocabulary)."""
    text = np.random.default_rng(seed).integers(0, VS, text_len).tolist()
    ids = text[:text_len // 2]
    for t, h, w in images.grid_thw:
        ids += [VS] + [IMG] * int(t * h * w // merge ** 2) + [VE]
    return VisionPrompt(ids + text[text_len // 2:], images=images)


def jit_prefill(model):
    """A jitted (state, ids [1, L], positions [3, 1, L], vision rows [1, L, H], mask [1, L]) -> last-token
    logits [1, V]: token embeddings with the vision features in place, the text model, the last position's logits."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, ids, positions, rows, mask):
        model = nnx.merge(graphdef, state)
        embeds = embed_multimodal(model, ids, rows, mask)
        return model.logits(model.hidden_states(ids, positions, embeds=embeds)[:, -1])
    return prefill, state


def ours_prefill(model, encoder, prompt: VisionPrompt):
    """A zero-argument callable running our multimodal prefill of `prompt` to last-token logits (numpy): the
    host-side mRoPE positions, `vision_features` (the encoder) gathered to the tokens, then `jit_prefill`."""
    prefill, state = jit_prefill(model)
    vcfg = model.config.vision
    ids = jnp.asarray(np.asarray(prompt.token_ids, np.int32)[None])

    def run():
        positions, _ = prompt_positions(prompt, vcfg)
        rows, mask = gather_features(vision_features(encoder, prompt), feature_index(prompt, vcfg)[None])
        return np.asarray(prefill(state, ids, jnp.asarray(positions)[:, None, :], jnp.asarray(rows),
                                  jnp.asarray(mask)))
    return run


def hf_prefill(hf, prompt: VisionPrompt):
    """A zero-argument callable running HF's forward on `prompt` to last-token logits (numpy)."""
    ids = torch.as_tensor([prompt.token_ids])
    kwargs = {"pixel_values": torch.as_tensor(prompt.images.pixel_values),
              "image_grid_thw": torch.as_tensor(prompt.images.grid_thw),
              "mm_token_type_ids": (ids == IMG).int(), "logits_to_keep": 1, "use_cache": False}

    def run():
        with torch.no_grad():
            return hf(ids, **kwargs).logits[:, -1].float().numpy()
    return run


def interleaved_medians(runs, repeats: int, warmup: int = 1) -> list[float]:
    """Median wall seconds of each zero-argument callable in `runs`, timed in turns (one run of each per round,
    after `warmup` untimed rounds) so that every side sees the same load of a shared machine."""
    for _ in range(warmup):
        for run in runs:
            run()
    rounds = [[median_seconds(run, 1, warmup=0) for run in runs] for _ in range(repeats)]
    return [statistics.median(times) for times in zip(*rounds)]


def encoder_seconds(hf, encoder, images: ProcessedVision, repeats: int) -> list[float]:
    """[HF, ours] median seconds to encode the batch of images (ours: the first call compiles)."""
    pixels, grid = torch.as_tensor(images.pixel_values), torch.as_tensor(images.grid_thw)

    def theirs():
        with torch.no_grad():
            hf.model.visual(pixels, grid_thw=grid)
    return interleaved_medians(
        [theirs, lambda: encoder.encode(images.pixel_values, images.grid_thw)], repeats)  # a host array: done


def prefill_seconds(hf, model, encoder, prompt: VisionPrompt, repeats: int) -> tuple[float, float, float, float]:
    """(HF, ours) median seconds of the multimodal prefill, max |ours - HF| and max |HF| of the last-token
    logits (that first call of each is also the warmup)."""
    hf_run, ours_run = hf_prefill(hf, prompt), ours_prefill(model, encoder, prompt)
    expected = hf_run()
    diff = float(np.abs(ours_run() - expected).max())
    return (*interleaved_medians([hf_run, ours_run], repeats, warmup=0), diff, float(np.abs(expected).max()))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--images", type=int, default=2, help="images per encoder batch and per prompt")
    parser.add_argument("--image-size", type=int, default=448, help="square image side, pixels")
    parser.add_argument("--text-len", type=int, default=128, help="text tokens in the prefill prompt")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vision-depth", type=int, default=4)
    parser.add_argument("--vision-hidden", type=int, default=256)
    parser.add_argument("--vision-heads", type=int, default=4)
    parser.add_argument("--vision-intermediate", type=int, default=512)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads for HF (default: torch's own default, all cores)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (images and text use seed + 1)")
    parser.add_argument("--json", action="store_true", help="also print a JSON object")
    args = parser.parse_args(argv)
    if min(args.images, args.image_size, args.repeats, args.text_len) < 1:
        parser.error("need --images, --image-size, --repeats and --text-len >= 1")
    return args


def measure(args) -> dict:
    """Builds the random checkpoint, loads ours from its files, times both sides: the figures as a JSON-able dict."""
    vision = dict(depth=args.vision_depth, hidden_size=args.vision_hidden, num_heads=args.vision_heads,
                  intermediate_size=args.vision_intermediate)
    hf = build_hf_multimodal(args.config, seed=args.seed, vision=vision)
    with tempfile.TemporaryDirectory(prefix="qwen35-random-") as folder:
        save_hf_model(hf, Path(folder))
        model, encoder = load_model(folder), load_vision_tower(folder)
    images = random_images(args.images, args.image_size, args.seed + 1)
    prompt = build_prompt(images, args.text_len, encoder.config.spatial_merge_size, args.seed + 1)
    enc_hf, enc_ours = encoder_seconds(hf, encoder, images, args.repeats)
    pre_hf, pre_ours, diff, scale = prefill_seconds(hf, model, encoder, prompt, args.repeats)
    n, tokens = args.images, len(prompt)
    return {
        "config": args.config, "vision": vision, "images": n, "image_size": args.image_size,
        "patches": len(images.pixel_values), "prompt_tokens": tokens, "repeats": args.repeats,
        "jax_devices": jax.device_count(), "torch_threads": torch.get_num_threads(),
        "logits_max_abs_diff": diff, "logits_max_abs_hf": scale,
        "encoder": {"hf_s": enc_hf, "ours_s": enc_ours, "hf_images_per_s": n / enc_hf,
                    "ours_images_per_s": n / enc_ours, "ratio": enc_hf / enc_ours},
        "prefill": {"hf_s": pre_hf, "ours_s": pre_ours, "hf_tokens_per_s": tokens / pre_hf,
                    "ours_tokens_per_s": tokens / pre_ours, "ratio": pre_hf / pre_ours},
    }


def print_report(f: dict) -> None:
    """The figures of `measure` as a header and a two-row table."""
    v, enc, pre = f["vision"], f["encoder"], f["prefill"]
    print(f"vision throughput, CPU ({f['jax_devices']} JAX devices, torch {f['torch_threads']} threads), float32, "
          f"median of {f['repeats']}, HF and ours in turns; config {f['config']}")
    print(f"vision tower depth {v['depth']}, hidden {v['hidden_size']}, heads {v['num_heads']}, intermediate "
          f"{v['intermediate_size']}; {f['images']} images of {f['image_size']}x{f['image_size']} px = "
          f"{f['patches']} patches (ours pads each image to {patch_bucket(f['patches'] // f['images'])}); "
          f"prompt {f['prompt_tokens']} tokens")
    print_table(["measure", "HF", "ours", "ours/HF"], [
        ["encoder images/s", f"{enc['hf_images_per_s']:.2f}", f"{enc['ours_images_per_s']:.2f}",
         f"{enc['ratio']:.2f}x"],
        ["prefill tokens/s", f"{pre['hf_tokens_per_s']:.0f}", f"{pre['ours_tokens_per_s']:.0f}",
         f"{pre['ratio']:.2f}x"],
    ])
    print(f"last-token logits: max |ours - HF| {f['logits_max_abs_diff']:.1e} (max |HF| {f['logits_max_abs_hf']:.1f})")


def main(argv=None):
    args = parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    figures = measure(args)
    print_report(figures)
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
