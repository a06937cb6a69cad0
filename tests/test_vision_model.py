"""The multimodal model against HF Qwen3_5(Moe)ForConditionalGeneration: mRoPE position ids, full forward
logits, and the vision tower through loading and conversion."""

import functools
import json
import types

import jax
import numpy as np
import pytest
import torch
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5Model

from qwen35_jax.checkpoint.orbax_io import convert_hf_to_orbax, export_to_hf
from qwen35_jax.checkpoint.safetensors_io import SafetensorsFolder
from qwen35_jax.hf_reference import TINY_VISION_TOKENS, build_hf_multimodal, save_hf_model
from qwen35_jax.loading import load_model, load_vision_tower
from qwen35_jax.vision.multimodal import (VisionPrompt, embed_multimodal, feature_index, gather_features,
                                          multimodal_logits, prompt_positions, vision_features)
from qwen35_jax.vision.processing import ProcessedVision
from qwen35_jax.vision.rope_index import PlaceholderError, mrope_positions

VS, VE, IMG, VID = (TINY_VISION_TOKENS[k] for k in ("vision_start_token_id", "vision_end_token_id",
                                                    "image_token_id", "video_token_id"))
IMAGE_GRIDS = [(1, 4, 6), (1, 8, 4)]   # a non-square image and a second one of another size (patches)
VIDEO_GRID = (3, 4, 4)                 # an odd number of temporal groups


def mixed_prompt(rng, image_grids=IMAGE_GRIDS, video_grid=VIDEO_GRID) -> list[int]:
    """Text, the images, more text, a video (each temporal group after its own timestamp text), text: token ids
    below the tiny vocabulary's special ids, placeholders expanded as HF's processor expands them."""
    def text(n):
        return rng.integers(0, 240, n).tolist()
    ids = text(5)
    for t, h, w in image_grids:
        ids += [VS] + [IMG] * (t * h * w // 4) + [VE] + text(3)
    if video_grid is not None:
        t, h, w = video_grid
        for _ in range(t):
            ids += text(4) + [VS] + [VID] * (h * w // 4) + [VE]
    return ids + text(6)


def random_vision(grids, seed) -> ProcessedVision | None:
    if not grids:
        return None
    grid = np.asarray(grids, np.int64)
    n = int(np.prod(grid, axis=1).sum())
    return ProcessedVision(np.random.default_rng(seed).uniform(-1, 1, (n, 1536)).astype(np.float32), grid)


def hf_rope_index(ids, image_grids, video_grids):
    """HF's get_rope_index on one row (bound to a stand-in `self` holding only the config it reads)."""
    ids_t = torch.as_tensor([ids])
    types_t = (ids_t == IMG).int() + 2 * (ids_t == VID).int()
    this = types.SimpleNamespace(config=types.SimpleNamespace(vision_config=types.SimpleNamespace(
        spatial_merge_size=2)))
    this.get_vision_position_ids = functools.partial(Qwen3_5Model.get_vision_position_ids, this)
    grids = lambda g: torch.as_tensor(g) if g else None  # noqa: E731
    positions, delta = Qwen3_5Model.get_rope_index(this, ids_t, types_t, grids(image_grids), grids(video_grids))
    return positions[:, 0].numpy(), int(delta[0, 0])


@pytest.mark.parametrize("image_grids,video_grids", [(IMAGE_GRIDS, [VIDEO_GRID]), ([(1, 2, 2)], []),
                                                     ([], [(2, 6, 2)]), ([], [])])
def test_mrope_positions_match_hf_get_rope_index(image_grids, video_grids):
    rng = np.random.default_rng(len(image_grids))
    ids = mixed_prompt(rng, image_grids, video_grids[0] if video_grids else None)
    ours, delta = mrope_positions(ids, IMG, VID, image_grids, video_grids)
    expected, expected_delta = hf_rope_index(ids, image_grids, video_grids)
    np.testing.assert_array_equal(ours, expected)
    assert delta == expected_delta


def test_placeholder_count_mismatch_is_a_clear_error():
    ids = mixed_prompt(np.random.default_rng(0), IMAGE_GRIDS, None)
    with pytest.raises(PlaceholderError, match="2 runs of image placeholders but 1 images"):
        mrope_positions(ids, IMG, VID, IMAGE_GRIDS[:1])
    with pytest.raises(PlaceholderError, match="image 1 has 8 placeholder tokens"):
        mrope_positions(ids, IMG, VID, [IMAGE_GRIDS[0], (1, 8, 8)])


@pytest.fixture(scope="module", params=["tiny-dense", "tiny-moe"])
def multimodal_checkpoint(request, tmp_path_factory):
    hf = build_hf_multimodal(request.param, seed=3)
    return hf, save_hf_model(hf, tmp_path_factory.mktemp(f"mm-{request.param}"))


def hf_multimodal_logits(hf, prompt: VisionPrompt) -> np.ndarray:
    ids = torch.as_tensor([prompt.token_ids])
    kwargs = {"mm_token_type_ids": (ids == IMG).int() + 2 * (ids == VID).int()}
    if prompt.images is not None:
        kwargs |= {"pixel_values": torch.as_tensor(prompt.images.pixel_values),
                   "image_grid_thw": torch.as_tensor(prompt.images.grid_thw)}
    if prompt.videos is not None:
        kwargs |= {"pixel_values_videos": torch.as_tensor(prompt.videos.pixel_values),
                   "video_grid_thw": torch.as_tensor(prompt.videos.grid_thw)}
    with torch.no_grad():
        return hf(ids, **kwargs).logits[0].float().numpy()


def test_multimodal_forward_matches_hf(multimodal_checkpoint):
    """Text + 2 images of different sizes + a 3-group video: logits at every position within 1e-4 of HF."""
    hf, folder = multimodal_checkpoint
    model, encoder = load_model(folder), load_vision_tower(folder)
    prompt = VisionPrompt(mixed_prompt(np.random.default_rng(1)), random_vision(IMAGE_GRIDS, 1),
                          random_vision([VIDEO_GRID], 2))
    expected = hf_multimodal_logits(hf, prompt)
    ours = np.asarray(multimodal_logits(model, encoder, prompt))[0]
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
    text_only = hf_multimodal_logits(hf, VisionPrompt(prompt.token_ids))  # the images do change the logits
    assert np.abs(text_only - expected).max() > 1e-2


def test_vision_tower_survives_conversion_round_trip(multimodal_checkpoint, tmp_path):
    """HF -> Orbax -> HF leaves every vision tensor bit-equal, and the Orbax checkpoint loads the same encoder."""
    _, folder = multimodal_checkpoint
    ckpt = convert_hf_to_orbax(folder, tmp_path / "ckpt", dtype="float32", progress=False)
    back = export_to_hf(ckpt, tmp_path / "back", progress=False)
    source, exported = SafetensorsFolder(folder), SafetensorsFolder(back)
    vision = [n for n in source.names() if n.startswith("model.visual.")]
    assert len(vision) > 10 and set(vision) <= set(exported.names())
    for name in vision:
        np.testing.assert_array_equal(exported.get(name), source.get(name), err_msg=name)
    pixels = random_vision([(1, 4, 6)], 5)
    from_hf = load_vision_tower(folder).encode(pixels.pixel_values, pixels.grid_thw)
    from_orbax = load_vision_tower(ckpt).encode(pixels.pixel_values, pixels.grid_thw)
    np.testing.assert_array_equal(np.asarray(from_orbax), np.asarray(from_hf))


def hf_greedy_multimodal(hf, prompt: VisionPrompt, n: int, image_id: int = IMG, video_id: int = VID) -> list[int]:
    """Greedy tokens from a cached loop over HF's forward: the multimodal prompt once, then one token per call
    (HF continues the mRoPE positions from its stored rope_deltas)."""
    ids = torch.as_tensor([prompt.token_ids])
    kwargs = {"mm_token_type_ids": (ids == image_id).int() + 2 * (ids == video_id).int()}
    for name, processed, pixels_key in (("image", prompt.images, "pixel_values"),
                                        ("video", prompt.videos, "pixel_values_videos")):
        if processed is not None:
            kwargs |= {pixels_key: torch.as_tensor(processed.pixel_values),
                       f"{name}_grid_thw": torch.as_tensor(processed.grid_thw)}
    tokens = []
    with torch.no_grad():
        out = hf(ids, use_cache=True, **kwargs)
        for _ in range(n):
            tokens.append(int(out.logits[0, -1].argmax()))
            out = hf(torch.as_tensor([[tokens[-1]]]), cache=out.cache, use_cache=True)
    return tokens


def test_greedy_generation_with_image_and_video_matches_hf_cached_loop(multimodal_checkpoint):
    """32 greedy tokens after an image prompt and after a video prompt, batched with a text prompt, equal HF's
    cached decode loop; the vision runs span several prefill chunks."""
    from infer.engine import Engine
    from infer.sampling import SamplingParams
    hf, folder = multimodal_checkpoint
    engine = Engine.load(folder, max_len=160, prefill_chunk=16)
    rng = np.random.default_rng(7)
    image = VisionPrompt(mixed_prompt(rng, [(1, 6, 4)], None), random_vision([(1, 6, 4)], 3))
    video = VisionPrompt(mixed_prompt(rng, [], (3, 4, 2)), videos=random_vision([(3, 4, 2)], 4))
    text = rng.integers(0, 240, 20).tolist()
    results = engine.generate([image, text, video], SamplingParams.greedy(max_new_tokens=32))
    assert results[0].token_ids == hf_greedy_multimodal(hf, image, 32)
    assert results[2].token_ids == hf_greedy_multimodal(hf, video, 32)
    assert results[1].token_ids == hf_greedy_multimodal(hf, VisionPrompt(text), 32)
    assert results[0].prompt_token_ids == list(image.token_ids)


def test_multimodal_on_8_devices_matches_one_device(multimodal_checkpoint):
    """Text model and vision tower sharded over expert=4 x tensor=2 fake devices: the multimodal logits equal
    the single-device ones and greedy decoding with an image gives the same tokens."""
    from infer.engine import Engine
    from infer.sampling import SamplingParams
    from qwen35_jax.sharding import make_mesh
    _, folder = multimodal_checkpoint
    if "tiny-dense" in str(folder):  # the MoE model shards everything the dense one does, plus its experts
        pytest.skip("sharding is checked on the MoE model (~90 s per model)")
    mesh = make_mesh("expert=4,tensor=2")
    prompt = VisionPrompt(mixed_prompt(np.random.default_rng(9), [(1, 4, 6)], (1, 2, 4)),
                          random_vision([(1, 4, 6)], 6), random_vision([(1, 2, 4)], 7))
    single = np.asarray(multimodal_logits(load_model(folder), load_vision_tower(folder), prompt))
    sharded_encoder = load_vision_tower(folder, mesh=mesh)
    qkv = sharded_encoder.blocks.attn.qkv[...]
    # [Dv, 3, heads, Dh]: Dv split over expert=4 (an fsdp axis outside the MoE), heads over tensor=2
    assert {s.data.nbytes for s in qkv.addressable_shards} == {qkv.nbytes // 8}
    sharded_model = load_model(folder, mesh=mesh)
    with jax.set_mesh(mesh):  # the MoE runs expert-parallel under the mesh, as in the engine
        sharded = np.asarray(multimodal_logits(sharded_model, sharded_encoder, prompt))
    np.testing.assert_allclose(sharded, single, atol=1e-5, rtol=0)
    params = SamplingParams.greedy(max_new_tokens=12)
    expected = Engine.load(folder, max_len=96).generate([prompt], params)[0].token_ids
    assert Engine.load(folder, max_len=96, mesh=mesh).generate([prompt], params)[0].token_ids == expected


def test_generate_cli_with_images(tmp_path, capsys):
    """`python -m infer.generate --chat --image A --image B --prompt ... --json` on a checkpoint with a real
    tokenizer: the token ids equal HF's cached greedy loop on the same processed prompt."""
    from PIL import Image

    from conftest import write_bpe_tokenizer
    from infer.engine import Engine
    from infer.generate import main
    from qwen35_jax.tokenizer import Tokenizer
    (tmp_path / "tok").mkdir()
    tokenizer = Tokenizer.load(write_bpe_tokenizer(tmp_path / "tok", vocab_size=300))
    ids = {"vision_start_token_id": tokenizer.token_id("<|vision_start|>"),
           "vision_end_token_id": tokenizer.token_id("<|vision_end|>"),
           "image_token_id": tokenizer.token_id("<|image_pad|>"), "video_token_id": tokenizer.token_id("<|video_pad|>")}
    hf = build_hf_multimodal("tiny-dense", seed=1, token_ids=ids, vocab_size=320)
    folder = save_hf_model(hf, tmp_path / "ckpt")
    write_bpe_tokenizer(folder, vocab_size=300)
    rng = np.random.default_rng(0)
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path, size in zip(paths, [(70, 40), (30, 50)]):
        Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(path)
    argv = ["--model", str(folder), "--chat", "--no-thinking", "--prompt", "What is this?", "--temperature", "0",
            "--max-new-tokens", "10", "--json", "--max-len", "512"]
    assert main(argv + ["--image", str(paths[0]), "--image", str(paths[1])]) == 0
    result = json.loads(capsys.readouterr().out.strip())
    engine = Engine.load(folder, max_len=512)
    prompt = engine.vision_prompt(messages=[{"role": "user", "content": [
        {"type": "image", "image": str(paths[0])}, {"type": "image", "image": str(paths[1])},
        {"type": "text", "text": "What is this?"}]}], enable_thinking=False)
    assert result["prompt_token_ids"] == list(prompt.token_ids)
    assert sum(t == ids["image_token_id"] for t in prompt.token_ids) == int(np.prod(prompt.images.grid_thw, 1).sum()) // 4
    assert result["token_ids"] == hf_greedy_multimodal(hf, prompt, 10, ids["image_token_id"], ids["video_token_id"])


def test_checkpoint_without_vision_tensors_serves_text(multimodal_checkpoint, tmp_path):
    """A fine-tuned checkpoint (`save_model`: the config keeps its vision tower, the arrays are the text model's)
    loads for text; an image prompt then gets a clear error instead of a crash."""
    from infer.engine import Engine
    from qwen35_jax.checkpoint.orbax_io import save_model
    _, folder = multimodal_checkpoint
    ckpt = save_model(load_model(folder), tmp_path / "tuned")
    engine = Engine.load(ckpt, max_len=64)
    assert engine.config.vision is not None and engine.vision is None
    assert len(engine.generate([[1, 2, 3]])[0].token_ids) > 0
    with pytest.raises(ValueError, match="no vision encoder"):
        engine.generate([VisionPrompt(mixed_prompt(np.random.default_rng(0), [(1, 2, 2)], None),
                                      random_vision([(1, 2, 2)], 0))])


def mtp_reference(model, encoder, prompt: VisionPrompt, token: int) -> np.ndarray:
    """The MTP hidden state [H] at a vision prompt's last position when `token` follows it, from full-sequence
    forwards: the main model over the multimodal embeddings at the mRoPE positions, then the MTP block at those
    positions with each following token's input embedding (its vision feature at an image or video token)."""
    import jax.numpy as jnp
    vcfg = model.config.vision
    ids = np.asarray(prompt.token_ids, np.int32)[None]
    rows, mask = gather_features(vision_features(encoder, prompt), feature_index(prompt, vcfg)[None])
    embeds = embed_multimodal(model, jnp.asarray(ids), jnp.asarray(rows), jnp.asarray(mask))
    positions = jnp.asarray(prompt_positions(prompt, vcfg)[0])[:, None, :]
    hidden = model.hidden_states(jnp.asarray(ids), positions=positions, embeds=embeds)
    following = jnp.concatenate([embeds[:, 1:], model.embed(jnp.asarray([[token]]))], axis=1)
    return np.asarray(model.mtp(hidden, following, positions=positions)[0, -1])


def test_speculative_decoding_after_image_and_video_prompts(multimodal_checkpoint, tmp_path, monkeypatch):
    """The checkpoint with an MTP block (random `mtp.*` tensors added). (1) After an image + video prompt prefilled
    in 16-token chunks, the MTP's hidden state at the prompt's last position equals `mtp_reference` (<= 1e-5):
    its cache holds the prompt at the main model's mRoPE positions, with the vision features as the following
    tokens' inputs. (2) K=2 speculative greedy decoding after an image, a text and a video prompt (batched) gives
    exactly the plain greedy tokens, with oracle drafts (every acceptance length occurs)."""
    import shutil

    import jax.numpy as jnp
    from flax import nnx
    from test_speculative import continuation_table, oracle_drafts

    import infer.speculative as speculative
    from infer.engine import Engine
    from infer.sampling import SamplingParams
    from qwen35_jax.hf_reference import add_mtp_tensors
    _, folder = multimodal_checkpoint
    if "tiny-dense" in str(folder):
        pytest.skip("speculative decoding with vision is checked on the MoE model (the MTP layer has its MoE)")
    folder = shutil.copytree(folder, tmp_path / "mtp")
    add_mtp_tensors(folder, seed=5, std=0.2)
    rng = np.random.default_rng(11)
    mixed = VisionPrompt(mixed_prompt(rng, [(1, 4, 6)], (1, 2, 4)), random_vision([(1, 4, 6)], 6),
                         random_vision([(1, 2, 4)], 7))
    engine = Engine.load(folder, max_len=160, prefill_chunk=16, num_speculative_tokens=2)
    logits, state, last_hidden = engine._run_prefill([mixed], engine.init_state(1))
    token = int(np.argmax(np.asarray(logits)[0]))
    model = nnx.merge(engine.graphdef, engine.params)
    got, _ = model.mtp.forward_with_state(last_hidden[:, None], model.embed(jnp.asarray([[token]])), state)
    expected = mtp_reference(load_model(folder), load_vision_tower(folder), mixed, token)
    np.testing.assert_allclose(np.asarray(got)[0, 0], expected, atol=1e-5, rtol=0)

    image = VisionPrompt(mixed_prompt(rng, [(1, 6, 4)], None), random_vision([(1, 6, 4)], 3))
    video = VisionPrompt(mixed_prompt(rng, [], (3, 4, 2)), videos=random_vision([(3, 4, 2)], 4))
    batch = [image, rng.integers(0, 240, 20).tolist(), video]
    params = SamplingParams.greedy(max_new_tokens=24)
    plain = [r.token_ids for r in Engine.load(folder, max_len=160, prefill_chunk=16).generate(batch, params)]
    ids = [list(p.token_ids) if isinstance(p, VisionPrompt) else p for p in batch]
    table = continuation_table(ids, plain, 200)
    monkeypatch.setattr(speculative, "draft_tokens", oracle_drafts(table, engine.config.vocab_size, 2,
                                                                  corrupt_every=3))
    results = engine.generate(batch, params)
    assert [r.token_ids for r in results] == plain
    assert 1.5 < np.mean([r.mean_acceptance_length for r in results]) <= 3
