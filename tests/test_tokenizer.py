"""Tokenizers built in-process (byte-level BPE and SentencePiece) and the chat template against HF."""


import pytest
from conftest import CORPUS, SPECIAL
from qwen35_jax.tokenizer import IncrementalDecoder, Tokenizer, TokenizerError

@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory):
    import sentencepiece as spm
    folder = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=str(folder / "tok"),
                                   vocab_size=320, character_coverage=1.0, byte_fallback=True,
                                   user_defined_symbols=SPECIAL[1:], minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   add_dummy_prefix=False)
    return folder


TEXTS = ["The lazy fox", "naïve café 東京 🚀", "  spaces\tand\nnewlines ", "<|im_start|>user\nhi<|im_end|>"]


@pytest.mark.parametrize("kind", ["bpe", "sp"])
def test_round_trip(kind, bpe_folder, sp_folder):
    tok = Tokenizer.load(bpe_folder if kind == "bpe" else sp_folder)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids and tok.decode(ids) == text
    assert tok.encode("<|im_start|>") == [tok.token_id("<|im_start|>")]


def test_bpe_matches_hf_tokenizer(bpe_folder):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(bpe_folder))
    tok = Tokenizer.load(bpe_folder)
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
    assert tok.eos_token_ids == (tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>"))


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_chat_template_matches_hf(bpe_folder, enable_thinking):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(bpe_folder))
    tok = Tokenizer.load(bpe_folder)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", "reasoning_content": "add"},
                {"role": "user", "content": "and 3+3?"}]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"a": "ñ"}}}]
    for kwargs in ({}, {"tools": tools}):
        ours = tok.apply_chat_template(messages, enable_thinking=enable_thinking, **kwargs)
        theirs = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                        enable_thinking=enable_thinking, **kwargs)
        assert ours == theirs
    assert ours.endswith("<think>\n" if enable_thinking else "<think>\n\n</think>\n\n")


@pytest.mark.parametrize("kind", ["bpe", "sp"])
def test_streaming_never_splits_characters(kind, bpe_folder, sp_folder):
    tok = Tokenizer.load(bpe_folder if kind == "bpe" else sp_folder)
    text = "naïve café 東京 🚀 done"
    decoder = IncrementalDecoder(tok)
    deltas = [decoder.push(i) for i in tok.encode(text)] + [decoder.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_missing_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json and no SentencePiece"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match="tokenizer.json: cannot be read"):
        Tokenizer.load(tmp_path)


def test_unrepresentable_text_warns_once_per_character(tmp_path):
    """A SentencePiece model without byte fallback (the demo's) maps unseen characters to <unk>: say which."""
    import random
    import warnings
    from train.demo import make_problems, train_tokenizer
    train_tokenizer(tmp_path, make_problems(300, 2, random.Random(0)))
    tok = Tokenizer.load(tmp_path)
    unk = tok.token_id("<unk>")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert unk not in tok.encode("12+34=")  # representable: silent
    with pytest.warns(UserWarning, match=r"cannot represent ' ' \(U\+0020\), 'x' \(U\+0078\): encoded as the "
                                         r"unknown token '<unk>'"):
        assert unk in tok.encode("12 x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert unk in tok.encode("x 3")  # already named
    with pytest.warns(UserWarning, match=r"cannot represent 'é' \(U\+00E9\):"):
        tok.encode("é x")


def test_unrepresentable_text_warns_with_a_tokenizers_file(tmp_path):
    import warnings
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers
    hf = HFTokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tok.encode("a b") == [0, 1]
    with pytest.warns(UserWarning, match=r"cannot represent 'c' \(U\+0063\).*'\[UNK\]'"):
        assert tok.encode("a c b") == [0, 2, 1]
