"""Images through the engine core and the OpenAI-compatible server: `image_url` content parts (data URLs and local
files) over real HTTP give the tokens of an isolated `Engine.generate` on the same processed prompt, and are never
served from the prefix cache (its keys are token ids, which do not see the pixels)."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from conftest import write_bpe_tokenizer
from infer import Engine, SamplingParams
from infer.scheduler import EngineCore
from infer.serve import create_app
from qwen35_jax.hf_reference import build_hf_multimodal, save_hf_model
from qwen35_jax.tokenizer import Tokenizer
from test_serve import ServerThread

MAX_LEN, NEW = 384, 8


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A tiny dense model with a vision tower whose special token ids are the BPE tokenizer's."""
    folder = tmp_path_factory.mktemp("vision-serve")
    tokenizer = Tokenizer.load(write_bpe_tokenizer(folder, vocab_size=300))
    ids = {f"{name}_token_id": tokenizer.token_id(f"<|{text}|>") for name, text in
           (("vision_start", "vision_start"), ("vision_end", "vision_end"), ("image", "image_pad"),
            ("video", "video_pad"))}
    save_hf_model(build_hf_multimodal("tiny-dense", seed=2, token_ids=ids, vocab_size=320), folder)
    return Engine.load(folder, max_len=MAX_LEN, prefill_chunk=32)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """The folder the server may read local image files from (--allowed-local-media-path)."""
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def server(engine, media):
    core = EngineCore(engine, max_batch=4, decode_steps=4, prefix_cache_bytes=64 << 20).start(warmup=False)
    http = ServerThread(create_app(core, engine, "tiny", allowed_local_media_path=media))
    yield http
    http.stop()
    core.drain(timeout=30)


def png_bytes(seed: int, size=(40, 56)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def ask(server, image_url: str, text: str = "What is in the picture?", **template_kwargs):
    return server.client.chat.completions.create(
        model="tiny", temperature=0, max_tokens=NEW,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                               {"type": "text", "text": text}]}],
        extra_body={"return_token_ids": True, "ignore_eos": True,
                    "chat_template_kwargs": {"enable_thinking": False, **template_kwargs}})


def expected_tokens(engine, image) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy ids) of an isolated Engine.generate on the same chat with an image part."""
    prompt = engine.vision_prompt(messages=[{"role": "user", "content": [
        {"type": "image", "image": image}, {"type": "text", "text": "What is in the picture?"}]}],
        enable_thinking=False)
    result = engine.generate([prompt], SamplingParams.greedy(max_new_tokens=NEW, ignore_eos=True))[0]
    return result.prompt_token_ids, result.token_ids


def test_image_url_data_and_file_match_isolated_generate(engine, server, media):
    images = [png_bytes(seed) for seed in range(2)]
    path = media / "second.png"
    path.write_bytes(images[1])
    replies = [ask(server, "data:image/png;base64," + base64.b64encode(images[0]).decode()),
               ask(server, str(path))]
    for image, reply in zip([Image.open(io.BytesIO(images[0])), str(path)], replies):
        prompt_ids, tokens = expected_tokens(engine, image)
        assert reply.prompt_token_ids == prompt_ids
        assert reply.choices[0].token_ids == tokens
    # the two prompts have the same token ids (same image size and text), yet different pixels and outputs:
    # nothing came from the prefix cache, whose keys are token ids
    assert replies[0].prompt_token_ids == replies[1].prompt_token_ids
    assert replies[0].choices[0].token_ids != replies[1].choices[0].token_ids


@pytest.mark.parametrize("url, kwargs, expected", [
    ("https://example.com/cat.png", {}, "https://example.com/cat.png' is not fetched"),
    ("data:image/png;base64,bm90IGFuIGltYWdl", {}, "image"),
    ("/etc/hostname", {}, "is outside --allowed-local-media-path"),           # no reading outside the folder
    ("MEDIA/missing.png", {}, "missing.png"),
    (None, {"image_cfg": 1}, "chat_template_kwargs"),                        # a keyword the prompt builder owns
])
def test_bad_image_input_gets_a_400_naming_it(server, media, url, kwargs, expected):
    import openai
    url = ("data:image/png;base64," + base64.b64encode(png_bytes(3)).decode() if url is None
           else url.replace("MEDIA", str(media)))
    with pytest.raises(openai.BadRequestError) as info:
        ask(server, url, **kwargs)
    assert expected in str(info.value)
    assert ask(server, "data:image/png;base64," + base64.b64encode(png_bytes(5)).decode()).choices  # still serving
