"""End to end with a real tokenizer: text prompts, streaming, chat template, EOS, stop strings, the CLI."""

import json

import pytest

from conftest import write_bpe_tokenizer
from infer import Engine, SamplingParams
from infer.generate import main
from qwen35_jax.hf_reference import build_hf_model, save_hf_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny MoE checkpoint folder with a byte-level BPE tokenizer (vocab 320 >= the tokenizer's 300)."""
    folder = save_hf_model(build_hf_model("tiny-moe", vocab_size=320), tmp_path_factory.mktemp("ckpt"))
    write_bpe_tokenizer(folder, vocab_size=300)
    return folder


def test_text_prompts_stream_and_match_generate(checkpoint):
    engine = Engine.load(checkpoint, max_len=128)
    params = SamplingParams.greedy(max_new_tokens=24, ignore_eos=True)
    results = engine.generate(["The quick brown", "naïve café"], params)
    deltas = {0: "", 1: ""}
    for event in engine.stream(["The quick brown", "naïve café"], params):
        deltas[event.index] += event.text  # (a random model emits invalid UTF-8 too: compare totals)
    for i, result in enumerate(results):
        assert result.text == deltas[i] == engine.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        assert len(result.token_ids) == 24 and result.finish_reason == "length"


def test_eos_and_stop_strings(checkpoint):
    engine = Engine.load(checkpoint, max_len=128)
    free = engine.generate(["The quick brown"], SamplingParams.greedy(max_new_tokens=24, ignore_eos=True))[0]
    eos = free.token_ids[3]
    engine.tokenizer.eos_token_ids = (eos,)
    stopped = engine.generate(["The quick brown"], SamplingParams.greedy(max_new_tokens=24))[0]
    assert stopped.token_ids == free.token_ids[:free.token_ids.index(eos) + 1] and stopped.finish_reason == "stop"
    engine.tokenizer.eos_token_ids = ()
    # A two-character stop string from the second half of the free text (never all whitespace): generation stops
    # there and returns the text before its first occurrence, without any part of it.
    text = free.text
    starts = [i for i in range(len(text) // 2, len(text) - 1) if not text[i:i + 2].isspace()]
    assert starts, f"no stop string candidate in {text!r}"
    stop = text[starts[0]:starts[0] + 2]
    result = engine.generate(["The quick brown"], SamplingParams.greedy(max_new_tokens=24, stop=(stop,)))[0]
    assert result.finish_reason == "stop" and result.text == text[:text.find(stop)]
    assert result.token_ids == free.token_ids[:len(result.token_ids)] and len(result.token_ids) < 24


def test_cli_json_and_chat(checkpoint, capsys):
    code = main(["--model", str(checkpoint), "--prompt", "Hello", "--prompt", "Bye", "--chat", "--no-thinking",
                 "--max-new-tokens", "6", "--temperature", "0", "--json"])
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert code == 0 and [x["prompt"] for x in lines] == ["Hello", "Bye"]
    for x in lines:
        assert len(x["token_ids"]) <= 6 and x["finish_reason"] in ("stop", "length")
        assert x["tokens_per_second"] > 0 and isinstance(x["text"], str)
    code = main(["--model", str(checkpoint), "--prompt", "Hello", "--max-new-tokens", "5", "--seed", "1"])
    assert code == 0 and capsys.readouterr().out


PLAIN_CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def letters_checkpoint(tmp_path_factory):
    """A tiny MoE whose greedy replies are ASCII letters, with a byte-level tokenizer without merges (256 bytes +
    5 specials) and a ChatML template without thinking blocks: a reply re-encodes to exactly its tokens and the
    template never rewrites history, so a chat's next turn always extends the tokens already fed."""
    import string

    import torch
    from qwen35_jax.tokenizer import Tokenizer
    folder = tmp_path_factory.mktemp("letters")
    write_bpe_tokenizer(folder, vocab_size=261)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": PLAIN_CHATML}))
    tokenizer = Tokenizer.load(folder)
    letters = [tokenizer.token_id(c) for c in string.ascii_letters]
    assert None not in letters and tokenizer.encode("hi there") == [tokenizer.token_id(c) for c in "hi"] + \
        [tokenizer.token_id(c) for c in "Ġthere"]  # one token per byte ("Ġ" is the byte-level space)
    hf = build_hf_model("tiny-moe", vocab_size=320)
    with torch.no_grad():  # lm_head rows of every other token zeroed: their logits are exactly 0, the letters'
        others = torch.ones(320, dtype=torch.bool)  # maximum is positive (52 random signs)
        others[letters] = False
        hf.lm_head.weight[others] = 0.0
    save_hf_model(hf, folder)
    return folder, tokenizer


def record_streams(monkeypatch) -> list[dict]:
    """Wraps Engine.stream: one {"engine", "prompt", "state_length", "tokens"} per call (row 0's prompt, tokens)."""
    calls, original = [], Engine.stream

    def stream(self, prompts, params=None, state=None):
        call = {"engine": self, "prompt": list(prompts[0]),
                "state_length": None if state is None else int(state["lengths"][0])}
        calls.append(call)
        events = list(original(self, prompts, params, state=state))
        call["tokens"] = [e.token_id for e in events]
        yield from events
    monkeypatch.setattr(Engine, "stream", stream)
    return calls


def test_cli_interactive_keeps_state(letters_checkpoint, capsys, monkeypatch):
    """Turn 2 continues turn 1's decode state: it feeds only the tokens the state has not seen, and its greedy
    reply equals a fresh generation over the whole rendered conversation."""
    folder, tokenizer = letters_checkpoint
    lines = iter(["hi there", "and again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    calls = record_streams(monkeypatch)
    assert main(["--model", str(folder), "--interactive", "--max-new-tokens", "4", "--temperature", "0",
                 "--max-len", "256"]) == 0
    assert len(calls) == 2
    first, second = calls
    reply = tokenizer.decode(first["tokens"], skip_special_tokens=True)
    assert len(first["tokens"]) == 4 and reply.isascii() and reply.isalpha()
    messages = [{"role": "user", "content": "hi there"}]
    assert first["state_length"] is None
    assert first["prompt"] == tokenizer.encode(tokenizer.apply_chat_template(messages))
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "and again"}]
    conversation = tokenizer.encode(tokenizer.apply_chat_template(messages))
    fed = first["prompt"] + first["tokens"][:-1]  # the last sampled token of turn 1 was never fed
    assert second["state_length"] == len(fed) and conversation[:len(fed)] == fed
    assert second["prompt"] == conversation[len(fed):]  # only the new tokens
    engine = second["engine"]  # the CLI's engine (its compiled steps), from an empty state
    fresh = engine.generate([conversation], SamplingParams.greedy(max_new_tokens=4))[0]
    assert second["tokens"] == fresh.token_ids
    out = capsys.readouterr().out
    assert reply in out and tokenizer.decode(fresh.token_ids, skip_special_tokens=True) in out


@pytest.mark.slow  # ~25 s: a second interactive CLI session (engine load and compiles)
def test_cli_interactive_refeeds_a_rewritten_history(checkpoint, capsys, monkeypatch):
    """With a thinking template the generation prompt's `<think>` is not part of the rendered history, so the
    next turn no longer extends what was fed: the loop starts a fresh state with the whole conversation."""
    lines = iter(["hi there", "and again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    calls = record_streams(monkeypatch)
    assert main(["--model", str(checkpoint), "--interactive", "--max-new-tokens", "4", "--temperature", "0",
                 "--max-len", "256"]) == 0
    assert [c["state_length"] for c in calls] == [None, None]
    assert len(calls[1]["prompt"]) > len(calls[0]["prompt"]) + 4  # turn 1, its reply and turn 2, all re-fed


def test_cli_bad_arguments(checkpoint, capsys):
    assert main(["--model", str(checkpoint), "--prompt", "x", "--top-p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["--model", str(checkpoint), "--prompt", "x", "--max-new-tokens", "0"]) == 2


def test_engine_loads_a_converted_checkpoint_with_its_tokenizer(checkpoint, tmp_path):
    from qwen35_jax.checkpoint.orbax_io import convert_hf_to_orbax
    ckpt = convert_hf_to_orbax(checkpoint, tmp_path / "ckpt", "float32", progress=False)
    params = SamplingParams.greedy(max_new_tokens=10, ignore_eos=True)
    from_hf = Engine.load(checkpoint, max_len=64).generate(["The quick brown"], params)[0]
    from_orbax = Engine.load(ckpt, max_len=64).generate(["The quick brown"], params)[0]
    assert from_orbax.token_ids == from_hf.token_ids and from_orbax.text == from_hf.text


@pytest.mark.parametrize("stop", ["fox jumps", "x j", "z"])
def test_stop_string_spanning_tokens_is_never_streamed(bpe_folder, stop):
    """Text is held back while it could still begin a stop string, so no part of one is ever shown."""
    from infer.engine import _Row
    from qwen35_jax.tokenizer import Tokenizer
    tok = Tokenizer.load(bpe_folder)
    text = "The quick brown fox jumps over the lazy dog."
    row = _Row(SamplingParams(stop=(stop,), max_new_tokens=100), tok)
    shown = "".join(row.accept(t, (), False) for t in tok.encode(text) if row.finish is None)
    cut = text.find(stop)
    if cut >= 0:
        assert row.finish == "stop" and shown == text[:cut]
    else:
        assert row.finish is None and text.startswith(shown) and len(shown) >= len(text) - len(stop)


def test_speculative_stop_string_inside_a_step_leaves_the_plain_decoding_state(checkpoint, tmp_path, monkeypatch):
    """K=3 with oracle drafts (every draft accepted: each step emits 4 tokens) and a stop string completed by a
    token inside a step: the text and tokens are plain decoding's, and `last_state` is plain decoding's too (the
    tokens up to the one that completed the stop string, not the step's tokens after it)."""
    import shutil

    import jax
    from test_speculative import assert_same_state, continuation_table, oracle_drafts

    import infer.speculative as speculative
    from qwen35_jax.hf_reference import add_mtp_tensors
    folder = shutil.copytree(checkpoint, tmp_path / "mtp")
    add_mtp_tensors(folder)
    plain = Engine.load(folder, max_len=128)
    prompt = "The quick brown"
    free = plain.generate([prompt], SamplingParams.greedy(max_new_tokens=24, ignore_eos=True))[0]
    decode = plain.tokenizer.decode

    def completed_at(stop):  # the index of the token whose text completes the first occurrence of stop
        return next(j for j in range(len(free.token_ids)) if stop in decode(free.token_ids[:j + 1],
                                                                             skip_special_tokens=True))
    text = free.text
    stops = [text[i:i + 2] for i in range(len(text) // 3, len(text) - 1) if not text[i:i + 2].isspace()]
    stop = next(s for s in stops if completed_at(s) % 4 != 0 and completed_at(s) < 20)  # token 0: prefill's
    params = SamplingParams.greedy(max_new_tokens=24, stop=(stop,), ignore_eos=True)
    expected = plain.generate([prompt], params)[0]
    plain_state = jax.device_get(plain.last_state)
    ids = plain.tokenizer.encode(prompt)
    table = continuation_table([ids], [free.token_ids], 160)
    monkeypatch.setattr(speculative, "draft_tokens", oracle_drafts(table, plain.config.vocab_size, 3, 1000))
    spec = Engine.load(folder, max_len=128, num_speculative_tokens=3)
    got = spec.generate([prompt], params)[0]
    assert (got.token_ids, got.text, got.finish_reason) == (expected.token_ids, expected.text, "stop")
    assert len(got.token_ids) == completed_at(stop) + 1 and got.mean_acceptance_length > 3
    assert_same_state(jax.device_get(spec.last_state), plain_state, [len(ids) + len(got.token_ids) - 1])
