"""Chat messages with images and videos -> VisionPrompt (qwen35_jax.vision.chat), against HF's Qwen3VLProcessor.

HF's `Qwen3VLVideoProcessor` needs torchvision. Where torchvision does not import, the processor gets a stand-in
video processor that runs HF's own stages (`hf_video_pipeline` of test_vision_processing: HF's frame sampling,
smart_resize, patchify, torch's uint8 bicubic) and returns HF's `VideoMetadata`; the placeholder text, timestamps
included, is still built by `Qwen3VLProcessor` itself and encoded by HF's tokenizer.
"""

import base64

import numpy as np
import pytest
from conftest import TEMPLATE, write_bpe_tokenizer
from PIL import Image
from test_vision_processing import RELEASED_VIDEO, hf_image_processor, hf_video_pipeline, rand_uint8

from qwen35_jax.config import VisionConfig
from qwen35_jax.tokenizer import Tokenizer
from qwen35_jax.vision.chat import expand_vision_placeholders, vision_chat_prompt
from qwen35_jax.vision.processing import ImageProcessorConfig, VisionInputError, process_images
from qwen35_jax.vision.rope_index import PlaceholderError

VISION_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                 "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_bpe_tokenizer(tmp_path_factory.mktemp("vision_chat"), vocab_size=400)


@pytest.fixture(scope="module")
def tok(folder):
    return Tokenizer.load(folder)


@pytest.fixture(scope="module")
def vcfg(tok):
    return VisionConfig(**{field: tok.token_id(text) for field, text in VISION_TOKENS.items()})


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "tall.png"
    Image.fromarray(rand_uint8(np.random.default_rng(1), 150, 90, 3)).save(path)
    return path


def hf_video_processor(monkeypatch):
    """HF's Qwen3VLVideoProcessor where torchvision imports, else a stand-in running HF's stages (module doc)."""
    import transformers
    from transformers.feature_extraction_utils import BatchFeature
    from transformers.video_processing_utils import BaseVideoProcessor, VideoProcessorMixin
    from transformers.video_utils import VideoMetadata
    try:
        return transformers.Qwen3VLVideoProcessor(**RELEASED_VIDEO)
    except ImportError:
        # without torchvision transformers exports no VideoProcessorMixin, the class processors check against
        monkeypatch.setattr(transformers, "VideoProcessorMixin", VideoProcessorMixin, raising=False)

    class HFStagesVideoProcessor(BaseVideoProcessor):
        merge_size, temporal_patch_size = 2, 2

        def __call__(self, videos, video_metadata, **kwargs):
            stages = [hf_video_pipeline(video, meta.fps) for video, meta in zip(videos, video_metadata)]
            metadata = [VideoMetadata(total_num_frames=meta.total_num_frames, fps=meta.fps, frames_indices=indices)
                        for meta, (indices, *_) in zip(video_metadata, stages)]
            return BatchFeature({"pixel_values_videos": np.concatenate([s[1] for s in stages]),
                                 "video_grid_thw": np.asarray([s[2] for s in stages]), "video_metadata": metadata},
                                skip_tensor_conversion=["video_metadata"])
    return HFStagesVideoProcessor()


def test_chat_with_images_and_video_matches_hf_processor(folder, tok, vcfg, png, monkeypatch):
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    from transformers.video_utils import VideoMetadata

    rng = np.random.default_rng(0)
    pil = Image.fromarray(rand_uint8(rng, 70, 130, 3))
    video = rand_uint8(rng, 9, 40, 72, 3)  # 3 fps -> 6 frames sampled at HF's 2 fps: 3 temporal groups
    messages = [{"role": "system", "content": "You describe media."},
                {"role": "user", "content": [{"type": "text", "text": "Look: "}, {"type": "image", "image": pil},
                                             {"type": "text", "text": " and "},
                                             {"type": "video", "video": video, "source_fps": 3.0}]},
                {"role": "assistant", "content": "A fox."},
                {"role": "user", "content": [{"type": "image", "image": str(png)},
                                             {"type": "text", "text": "And this?"}]}]
    prompt = vision_chat_prompt(tok, messages, vcfg)

    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    processor = Qwen3VLProcessor(image_processor=hf_image_processor(ImageProcessorConfig()), tokenizer=hf_tok,
                                 video_processor=hf_video_processor(monkeypatch), chat_template=TEMPLATE)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    theirs = processor(text=[text], images=[pil, str(png)], videos=[video], return_tensors="np",
                       video_metadata=[VideoMetadata(total_num_frames=len(video), fps=3.0)])

    assert list(prompt.token_ids) == theirs["input_ids"][0].tolist()
    np.testing.assert_array_equal(prompt.images.grid_thw, theirs["image_grid_thw"])
    np.testing.assert_array_equal(prompt.images.pixel_values, theirs["pixel_values"])
    np.testing.assert_array_equal(prompt.videos.grid_thw, theirs["video_grid_thw"])
    np.testing.assert_array_equal(prompt.videos.pixel_values, theirs["pixel_values_videos"])
    decoded = tok.decode(prompt.token_ids)  # the layout the comparison covers: 2 images, 3 video groups
    assert decoded.count("<|vision_start|>") == 2 + 1 + 3 and "<0.3 seconds><|vision_start|>" in decoded
    assert prompt.images.grid_thw.tolist() == [[1, 12, 22], [1, 22, 14]]


def test_image_url_parts(tok, vcfg, png, tmp_path):
    def ask(part):
        return vision_chat_prompt(tok, [{"role": "user", "content": [part, {"type": "text", "text": "What?"}]}], vcfg)

    expected = ask({"type": "image", "image": str(png)})
    data_url = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    for url in (data_url, png.as_uri(), str(png)):
        got = ask({"type": "image_url", "image_url": {"url": url}})
        assert got.token_ids == expected.token_ids
        np.testing.assert_array_equal(got.images.pixel_values, expected.images.pixel_values)
    with pytest.raises(VisionInputError, match="https://example.com/cat.png"):
        ask({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}})
    with pytest.raises(VisionInputError, match="data URL"):
        ask({"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}})
    with pytest.raises(VisionInputError, match="'audio'"):
        ask({"type": "audio", "audio": "x.wav"})


def test_text_only_chat(tok, vcfg):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    prompt = vision_chat_prompt(tok, messages, vcfg, enable_thinking=False)
    plain = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], enable_thinking=False)
    assert prompt.token_ids == tuple(tok.encode(plain)) and prompt.images is None and prompt.videos is None


def test_template_ignoring_content_lists(folder, vcfg, tmp_path, png):
    (tmp_path / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}\n{% endfor %}")
    messages = [{"role": "user", "content": [{"type": "image", "image": str(png)}, {"type": "text", "text": "x"}]}]
    with pytest.raises(PlaceholderError, match=r"0 <\|image_pad\|> placeholder\(s\) but 1 image"):
        vision_chat_prompt(Tokenizer.load(tmp_path), messages, vcfg)


def test_expand_raw_prompt(png):
    images = process_images([str(png)])
    one = "<|vision_start|><|image_pad|><|vision_end|>"
    text = expand_vision_placeholders(f"Describe {one}.", images, None, merge_size=2)
    assert text == f"Describe <|vision_start|>{'<|image_pad|>' * (22 * 14 // 4)}<|vision_end|>."
    with pytest.raises(PlaceholderError, match=r"2 <\|image_pad\|> placeholder\(s\) but 1 image"):
        expand_vision_placeholders(one * 2, images, None, merge_size=2)
    with pytest.raises(PlaceholderError, match=r"1 <\|video_pad\|> placeholder\(s\) but 0 video"):
        expand_vision_placeholders(one + "<|video_pad|>", images, None, merge_size=2)
