"""Test setup: 8 fake CPU devices for JAX (before JAX starts), offline HF, tiny random reference models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")  # tests never need an accelerator; libtpu (the tpu extra) is for AOT only

import json  # noqa: E402

import pytest  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

from qwen35_jax.hf_reference import build_hf_model, save_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """Builds (once per session) and returns (hf_model, folder) for a preset name."""
    cache = {}

    def get(preset: str):
        if preset not in cache:
            model = build_hf_model(preset, seed=0)
            cache[preset] = (model, save_hf_model(model, tmp_path_factory.mktemp(preset)))
        return cache[preset]
    return get


CORPUS = ["The quick brown fox jumps over the lazy dog.", "Qwen3.5 mixes Gated DeltaNet and attention.",
          "Ünïcödé text: naïve café, 東京, emoji 🚀 and 12345 digits.", "def f(x):\n    return x + 1\n"] * 20
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"]

# A ChatML template in the style of Qwen3.5's (system, tools, reasoning kept after the last user turn,
# thinking switch in the generation prompt). Content lists are rendered as Qwen3.5's `render_content` does: an image
# part (type image, or an image / image_url key) -> <|vision_start|><|image_pad|><|vision_end|>, a video part the
# same with <|video_pad|>, text parts concatenated; any other content is printed as is.
TEMPLATE = """{%- macro render_content(content) %}
{%- if content is iterable and content is not string and content is not mapping %}
{%- for item in content %}
{%- if 'image' in item or 'image_url' in item or item.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>
{%- elif 'video' in item or item.type == 'video' %}<|vision_start|><|video_pad|><|vision_end|>
{%- elif 'text' in item %}{{ item.text }}
{%- else %}{{ raise_exception('Unexpected item type in content.') }}
{%- endif %}
{%- endfor %}
{%- else %}{{ content }}
{%- endif %}
{%- endmacro %}
{%- if tools %}<|im_start|>system
# Tools
<tools>{% for t in tools %}
{{ t | tojson }}{% endfor %}
</tools><|im_end|>
{% endif %}
{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{%- for m in messages %}
{%- if m.role == 'assistant' %}
<|im_start|>assistant
{% if m.reasoning_content and loop.index0 > ns.last_user %}<think>
{{ m.reasoning_content }}
</think>

{% endif %}{{ render_content(m.content) }}<|im_end|>
{% else %}
<|im_start|>{{ m.role }}
{{ render_content(m.content) }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% else %}<think>
{% endif %}{% endif %}"""


def write_bpe_tokenizer(folder, vocab_size=400):
    """A byte-level BPE tokenizer.json trained in-process, with a chat template and generation config."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": TEMPLATE}))
    eos = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return folder




@pytest.fixture(scope="session")
def bpe_folder(tmp_path_factory):
    return write_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))
