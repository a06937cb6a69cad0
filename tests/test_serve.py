"""The OpenAI-compatible server over real HTTP on loopback, with the official `openai` client, plus the pure
parts (reasoning / tool-call parsing, request validation).

One server (max_batch 8, max_len 256, prefill_chunk 32, decode_steps 4, prefix cache on) serves the module; a
second core with the cache off runs the prefix-cache comparison; a scripted fake core checks 429 / drain / 503
without the cost of a second compile."""

import json
import random
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from conftest import write_bpe_tokenizer
from infer import Engine, SamplingParams
from infer.chat_parsing import (ReasoningParser, ToolCallParser, parse_reasoning, parse_tool_calls,
                                prompt_opens_reasoning)
from infer.openai_api import APIError, parse_chat, parse_completion
from infer.scheduler import EngineCore, QueueFull, ShuttingDown, TokenOutput
from infer.serve import DrainingServer, create_app, main
from qwen35_jax.hf_reference import build_hf_model, save_hf_model

MAX_LEN, MODEL = 256, "tiny"
SYSTEM = ("You are a careful assistant. The quick brown fox jumps over the lazy dog. Qwen3.5 mixes Gated "
          "DeltaNet and attention. def f(x): return x + 1. ")      # ~130 tokens: 4 prefill chunks of 32
WORDS = "the quick brown fox jumps over lazy dog naïve café 東京 12345 digits return".split()


# ---- pure parsing ------------------------------------------------------------------------------------------
def stream_reasoning(pieces, **kw):
    parser, thought, content = ReasoningParser(**kw), "", ""
    for piece in pieces:
        t, c = parser.feed(piece)
        thought, content = thought + t, content + c
    t, c = parser.finish()
    return thought + t, content + c


def splits(text, rng):
    """Every single-character split, plus random ones."""
    yield list(text)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 6))))
        yield [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("text, kw, expected", [
    ("plan it\n</think>\n\nThe answer.", {"in_reasoning": True}, ("plan it\n", "\n\nThe answer.")),
    ("still thinking </thi", {"in_reasoning": True}, ("still thinking </thi", None)),
    ("<think>\nhmm</think>ok", {}, ("\nhmm", "ok")),
    ("  \n<think>a</think>b", {}, ("a", "b")),
    ("Just an answer <think> not a block", {}, (None, "Just an answer <think> not a block")),
    ("<thin", {}, (None, "<thin")),
    ("plan</think>answer", {"in_reasoning": True, "enabled": False}, (None, "plan</think>answer")),
    ("", {"in_reasoning": True}, ("", None)),
])
def test_reasoning_split_streaming_equals_whole(text, kw, expected):
    thought, content = parse_reasoning(text, **kw)
    assert (thought, content or None) == expected
    for pieces in splits(text, random.Random(0)) if len(text) > 1 else [[text]]:
        assert stream_reasoning(pieces, **kw) == (thought or "", content), pieces


def test_reasoning_end_by_token_id_when_the_tag_text_is_skipped():
    parser = ReasoningParser(in_reasoning=True, end_id=7)
    assert parser.feed("think") == ("think", "")
    assert parser.feed("", token_id=7) == ("", "")        # a special </think> decodes to nothing
    assert parser.feed("answer", token_id=9) == ("", "answer")
    parser = ReasoningParser(start_id=6)
    assert parser.feed("", token_id=6) == ("", "") and parser.feed("x") == ("x", "")


def test_prompt_opens_reasoning():
    assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n")


CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}'


@pytest.mark.parametrize("text, content, calls", [
    (f"<tool_call>\n{CALL}\n</tool_call>", "", [("get_weather", {"city": "Paris", "unit": "°C"})]),
    (f"Let me check.\n<tool_call>{CALL}</tool_call>\n<tool_call>{{\"name\": \"f\"}}</tool_call>\n",
     "Let me check.", [("get_weather", {"city": "Paris", "unit": "°C"}), ("f", {})]),
    ("<tool_call>{not json}</tool_call> rest", "<tool_call>{not json}</tool_call> rest", []),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    (f"cut short <tool_call>{CALL[:20]}", f"cut short <tool_call>{CALL[:20]}", []),
    ("no calls, a < sign and <tool", "no calls, a < sign and <tool", []),
    ("  \n", "  \n", []),
])
def test_tool_calls_streaming_equals_whole(text, content, calls):
    got_content, got_calls = parse_tool_calls(text)
    assert got_content == content
    assert [(c["name"], json.loads(c["arguments"])) for c in got_calls] == calls
    for pieces in splits(text, random.Random(1)):
        parser, streamed, streamed_calls = ToolCallParser(), "", []
        for piece in pieces:
            c, new = parser.feed(piece)
            streamed, streamed_calls = streamed + c, streamed_calls + new
        streamed += parser.finish()[0]
        assert (streamed, streamed_calls) == (got_content, got_calls), pieces


def test_request_validation_names_the_field():
    ok = {"messages": [{"role": "user", "content": "hi"}]}
    cases = [({"messages": []}, "messages"), ({"messages": "hi"}, "messages"),
             ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
             ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
             ({**ok, "temperature": "hot"}, "temperature"), ({**ok, "temperature": -1}, "temperature"),
             ({**ok, "top_p": 0}, "top_p"), ({**ok, "top_k": 1.5}, "top_k"), ({**ok, "n": 0}, "n"),
             ({**ok, "n": 17}, "n"), ({**ok, "max_tokens": 0}, "max_tokens"), ({**ok, "stop": [""]}, "stop"),
             ({**ok, "stop": 3}, "stop"), ({**ok, "seed": True}, "seed"), ({**ok, "top_logprobs": 3}, "top_logprobs"),
             ({**ok, "logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({**ok, "stream": "yes"}, "stream"),
             ({**ok, "stream_options": {"include_usage": True}}, "stream_options"),
             ({**ok, "tool_choice": "required"}, "tool_choice"), ({**ok, "tools": [{"type": "function"}]}, "tools[0]"),
             ({**ok, "presence_penalty": 3}, "presence_penalty"), ({**ok, "logit_bias": {"1": 5}}, "logit_bias"),
             ({**ok, "chat_template_kwargs": []}, "chat_template_kwargs"),
             ({**ok, "stop_token_ids": [999]}, "stop_token_ids"),
             ({**ok, "response_format": {"type": "json_object"}}, "response_format")]
    for body, param in cases:
        with pytest.raises(APIError) as e:
            parse_chat(body, MODEL, 320)
        assert e.value.status == 400 and e.value.param == param, (body, e.value.message)
    with pytest.raises(APIError) as e:
        parse_chat({**ok, "model": "gpt-4"}, MODEL, 320)
    assert e.value.status == 404 and e.value.param == "model"
    req = parse_chat({**ok, "top_k": -1, "stop": "x", "seed": 5, "n": 2, "max_completion_tokens": 9}, MODEL, 320)
    params = req.options.sampling_params(10, MAX_LEN, "messages", choice=1)
    assert (params.top_k, params.stop, params.seed, params.max_new_tokens) == (0, ("x",), 6, 9)
    assert req.options.sampling_params(10, MAX_LEN, "messages").max_new_tokens == 9
    default = parse_chat(ok, MODEL, 320).options.sampling_params(10, MAX_LEN, "messages")
    assert default == SamplingParams(max_new_tokens=MAX_LEN - 10)   # vLLM's defaults: SamplingParams'
    for prompt_len, max_tokens, param in [(MAX_LEN, None, "messages"), (100, MAX_LEN - 99, "max_tokens")]:
        req = parse_chat({**ok, "max_tokens": max_tokens}, MODEL, 320)
        with pytest.raises(APIError) as e:
            req.options.sampling_params(prompt_len, MAX_LEN, "messages")
        assert e.value.param == param
    for prompt in (None, [], [1, "a"], [[1, 400]], 5):
        with pytest.raises(APIError) as e:
            parse_completion({"prompt": prompt}, MODEL, 320)
        assert e.value.param == "prompt"


def test_cli_refuses_bad_arguments_before_loading(capsys):
    assert main(["--model", "/no/such/folder", "--max-batch", "0"]) == 2
    assert "--max-batch=0" in capsys.readouterr().err
    assert main(["--model", "/no/such/folder"]) == 2
    assert "/no/such/folder" in capsys.readouterr().err


# ---- servers -----------------------------------------------------------------------------------------------
class ServerThread:
    """uvicorn serving `app` on a free loopback port, in a thread."""

    def __init__(self, app, server_class=uvicorn.Server):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = server_class(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=120)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)

    def metrics(self) -> dict:
        text = httpx.get(self.url + "/metrics").text
        return {s.name + json.dumps(s.labels, sort_keys=True) if s.labels else s.name: s.value
                for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A tiny MoE checkpoint with a byte-level BPE tokenizer (vocab 300 <= the model's 320)."""
    folder = save_hf_model(build_hf_model("tiny-moe", vocab_size=320), tmp_path_factory.mktemp("serve"))
    write_bpe_tokenizer(folder, vocab_size=300)
    return Engine.load(folder, max_len=MAX_LEN, prefill_chunk=32)


@pytest.fixture(scope="module")
def server(engine):
    core = EngineCore(engine, max_batch=8, max_queue=256, decode_steps=4, prefix_cache_bytes=64 << 20).start()
    http = ServerThread(create_app(core, engine, MODEL))
    http.core, http.warm_counts = core, dict(core.trace_counts())
    yield http
    http.stop()
    core.drain(timeout=30)


def chat_messages(i: int, system: str | None = None) -> list[dict]:
    rng = random.Random(i)
    user = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 15)))
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def stream_chat(client, messages, max_tokens, ignore_eos=True, thinking=True, **extra):
    """One streaming greedy chat request; returns (prompt ids, token ids, reasoning, content, finish, usage)."""
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True},
        extra_body={"return_token_ids": True, "ignore_eos": ignore_eos,
                    "chat_template_kwargs": {"enable_thinking": thinking}, **extra})
    prompt_ids, ids, reasoning, content, finish, usage = None, [], "", "", None, None
    for chunk in stream:
        prompt_ids = prompt_ids or getattr(chunk, "prompt_token_ids", None)
        usage = chunk.usage or usage
        for choice in chunk.choices:
            ids += getattr(choice, "token_ids", None) or []
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return prompt_ids, ids, reasoning, content, finish, usage


def rendered_ids(engine, messages, thinking=True):
    return engine.tokenizer.encode(engine.tokenizer.apply_chat_template(messages, enable_thinking=thinking))


# ---- over HTTP ---------------------------------------------------------------------------------------------
def test_32_concurrent_streaming_chats_match_isolated_generate(server, engine):
    jobs = [(chat_messages(i, SYSTEM if i % 3 == 0 else None), [1, 3, 8, 17, 30, 45][i % 6], i % 4 != 1,
             i % 2 == 0) for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda job: stream_chat(server.client, *job), jobs))
    for (messages, n, ignore_eos, thinking), (prompt_ids, ids, reasoning, content, finish, usage) in zip(jobs, results):
        expected_prompt = rendered_ids(engine, messages, thinking)
        ref = engine.generate([expected_prompt], SamplingParams.greedy(max_new_tokens=n, ignore_eos=ignore_eos))[0]
        assert prompt_ids == expected_prompt
        assert ids == ref.token_ids, (n, ignore_eos)
        assert finish == ref.finish_reason
        assert reasoning + content == ref.text               # the think tags are special tokens here: no text
        if not thinking:
            assert reasoning == ""
        elif engine.tokenizer.token_id("</think>") not in ids:   # the prompt opened a think block: still in it
            assert content == ""
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(expected_prompt), len(ids))
    assert server.core.stats()["running"] == 0


def test_prefix_cache_on_and_off_give_the_same_tokens(server, engine):
    off_core = EngineCore(engine, max_batch=8, decode_steps=4, prefix_cache_bytes=0).start()
    off = ServerThread(create_app(off_core, engine, MODEL))
    try:
        jobs = [(chat_messages(100 + i, SYSTEM), 12) for i in range(6)]
        results = {}
        for name, srv in (("on", server), ("off", off)):
            stream_chat(srv.client, *jobs[0])                    # the first request fills the cache
            with ThreadPoolExecutor(6) as pool:
                results[name] = list(pool.map(lambda job: stream_chat(srv.client, *job), jobs))
        for on, off_result in zip(results["on"], results["off"]):
            assert on[1] == off_result[1]
            assert on[5].prompt_tokens_details.cached_tokens >= 96     # the shared system prompt: 3+ chunks of 32
            assert off_result[5].prompt_tokens_details.cached_tokens == 0
        metrics = server.metrics()
        assert metrics["qwen35_prefix_cache_hit_tokens_total"] >= 6 * 96
        assert 0 < metrics["qwen35_prefix_cache_hit_rate"] <= 1
    finally:
        off.stop()
        off_core.drain(timeout=30)


def test_no_retrace_after_warmup(server, engine):
    """40 requests (not 200, to stay quick) of varied prompt and output lengths, sampling settings, logprobs,
    stop strings and n, through both endpoints, compile nothing new after the core's warm-up."""
    rng = random.Random(7)

    def one(i):
        prompt = [rng.randrange(300) for _ in range(rng.randint(1, 200))]
        body = {"model": MODEL, "prompt": prompt, "max_tokens": rng.randint(1, MAX_LEN - len(prompt)),
                "temperature": rng.choice([0, 0.7, 1.3]), "top_k": rng.choice([0, 5]), "top_p": rng.choice([1, 0.9]),
                "presence_penalty": rng.choice([0, 1.0]), "repetition_penalty": rng.choice([1, 1.2]),
                "seed": i, "logprobs": rng.choice([None, 0, 3]), "n": rng.choice([1, 1, 2])}
        if i % 2:
            return httpx.post(server.url + "/v1/completions", json=body, timeout=120).status_code
        return server.client.chat.completions.create(
            model=MODEL, messages=chat_messages(i), max_tokens=body["max_tokens"] // 4 + 1, stop=["e"],
            temperature=body["temperature"], seed=i, logprobs=True, top_logprobs=2).choices[0].finish_reason

    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(one, range(40)))
    assert all(o in (200, "stop", "length") for o in outcomes), outcomes
    assert server.core.trace_counts() == server.warm_counts


def test_a_disconnect_frees_its_slot(server):
    def running():
        return server.metrics()["qwen35_num_requests_running"]

    def finished():
        return sum(v for k, v in server.metrics().items() if k.startswith("qwen35_requests_finished_total"))

    done_before = finished()
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": [5, 6, 7], "max_tokens": MAX_LEN - 3, "ignore_eos": True,
                            "stream": True, "temperature": 0}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert running() == 1
    deadline = time.monotonic() + 10
    while running() != 0:
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.01)
    time.sleep(0.2)
    assert finished() == done_before       # cancelled, not run to its end: no finished generation was recorded


def test_bad_input_gets_a_400_naming_the_field_and_the_server_keeps_serving(server):
    chat, completions = server.url + "/v1/chat/completions", server.url + "/v1/completions"
    ok = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    long_text = "digits 12345 " * 200
    cases = [
        (chat, b"{not json", 400, None), (chat, b"[1, 2]", 400, None),
        (chat, {**ok, "model": "gpt-4o"}, 404, "model"), (chat, {**ok, "messages": []}, 400, "messages"),
        (chat, {**ok, "temperature": "hot"}, 400, "temperature"), (chat, {**ok, "max_tokens": "9"}, 400, "max_tokens"),
        (chat, {**ok, "max_tokens": MAX_LEN}, 400, "max_tokens"), (chat, {**ok, "n": 1000}, 400, "n"),
        (chat, {**ok, "messages": [{"role": "user", "content": long_text}]}, 400, "messages"),
        (chat, {**ok, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
        (chat, {**ok, "chat_template_kwargs": {"eos_token": 1}}, 400, "chat_template_kwargs"),
        (completions, {"model": MODEL, "prompt": [1, 2, 10**6]}, 400, "prompt"),
        (completions, {"model": MODEL, "prompt": ""}, 400, "prompt"),
        (completions, {"model": MODEL, "prompt": list(range(200)) * 2}, 400, "prompt"),
        (completions, {"model": MODEL, "prompt": "hi", "logprobs": 99}, 400, "logprobs"),
        (completions, {"model": MODEL, "prompt": "hi", "seed": 2**70}, 400, "seed"),
        (server.url + "/v1/nothing", {}, 404, None),
    ]
    for url, body, status, param in cases:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"}) if isinstance(body, bytes) \
            else httpx.post(url, json=body)
        assert r.status_code == status, (body, r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["message"] and "type" in error, (body, error)
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    assert e.value.body["param"] == "messages"
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    reply = server.client.chat.completions.create(**ok)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1


def test_non_streaming_chat_and_completions(server, engine):
    models = server.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    messages = chat_messages(3)
    reply = server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                  n=2, logprobs=True, top_logprobs=3,
                                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    ref = engine.generate([rendered_ids(engine, messages)],
                          SamplingParams.greedy(max_new_tokens=10, ignore_eos=True))[0]
    for choice in reply.choices:
        assert choice.token_ids == ref.token_ids
        message = choice.message
        assert (message.reasoning_content or "") + (message.content or "") == ref.text
        assert [len(t.top_logprobs) for t in choice.logprobs.content] == [3] * 10
        assert all(t.logprob <= 0 and t.top_logprobs[0].logprob >= t.logprob - 1e-5 for t in choice.logprobs.content)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ref.prompt_token_ids), 20)
    completion = server.client.completions.create(model=MODEL, prompt=["The quick", [5, 9, 11]], max_tokens=6,
                                                  temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    refs = [engine.generate([p], SamplingParams.greedy(max_new_tokens=6, ignore_eos=True))[0]   # batch 1: compiled
            for p in ("The quick", [5, 9, 11])]
    assert [c.text for c in completion.choices] == [r.text for r in refs]
    assert all(len(c.logprobs.tokens) == 6 and c.finish_reason == "length" for c in completion.choices)
    assert completion.usage.completion_tokens == 12


def test_metrics_report_load_and_latency(server):
    server.client.completions.create(model=MODEL, prompt="The quick", max_tokens=5, temperature=0)
    metrics = server.metrics()
    for name in ("qwen35_num_requests_waiting", "qwen35_num_requests_running", "qwen35_generation_tokens_per_second",
                 "qwen35_prefix_cache_hit_rate"):
        assert name in metrics
    assert metrics["qwen35_max_num_slots"] == 8
    assert metrics["qwen35_prompt_tokens_total"] > 0 and metrics["qwen35_generation_tokens_total"] >= 5
    assert metrics["qwen35_time_to_first_token_seconds_count"] >= 1
    assert metrics["qwen35_inter_token_latency_seconds_count"] >= 4
    assert metrics["qwen35_generation_tokens_per_second"] > 0


# ---- overload and drain, through a scripted core ------------------------------------------------------------
class FakeCore:
    """EngineCore's interface over a thread that emits `tokens` outputs `delay` seconds apart per request (texts
    from `script`, else "A"; the last finishes with `finish`)."""

    def __init__(self, max_queue=1, tokens=20, delay=0.02, script=None, finish="length"):
        self.max_queue, self.delay, self.script, self.finish = max_queue, delay, script, finish
        self.tokens = len(script) if script else tokens
        self.threads, self.draining = [], False

    def submit(self, prompt_ids, params, on_output, logprobs=None):
        if self.draining:
            raise ShuttingDown("draining")
        if len([t for t in self.threads if t.is_alive()]) >= self.max_queue:
            raise QueueFull("1 request is waiting (max_queue=1)")
        request = type("Req", (), {"cancel": lambda self: None, "cached_tokens": 0})()

        def run():
            for k in range(1, self.tokens + 1):
                time.sleep(self.delay)
                text = self.script[k - 1] if self.script else "A"
                on_output(TokenOutput(65, text, self.finish if k == self.tokens else None, None, None, k))
        self.threads.append(threading.Thread(target=run, daemon=True))
        self.threads[-1].start()
        return request

    def drain(self, timeout=None):
        self.draining = True
        for t in self.threads:
            t.join(timeout)
        return True

    def stats(self):
        return dict.fromkeys(("waiting", "running", "max_batch", "prompt_tokens_total", "generation_tokens_total",
                              "prefix_cache_queries", "prefix_cache_hits", "prefix_cache_hit_tokens",
                              "prefix_cache_bytes"), 0)


def test_queue_full_is_429_and_a_drain_finishes_running_requests_then_503(engine):
    """SIGTERM's handler (called directly, no signal sent) drains: the running stream finishes, new requests
    get 503, then the server exits by itself; a second signal would force the exit."""
    app = create_app(FakeCore(), engine, MODEL)
    http = ServerThread(app, DrainingServer)
    try:
        body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 20}
        with httpx.stream("POST", http.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as running:
            lines = running.iter_lines()
            first = next(lines)
            assert first.startswith("data: ")
            busy = httpx.post(http.url + "/v1/completions", json=body)
            assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
            http.server.handle_exit(signal.SIGTERM, None)        # what SIGTERM runs: app.state.begin_drain()
            assert app.state.server.draining and not http.server.should_exit
            refused = httpx.post(http.url + "/v1/chat/completions",
                                 json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
            assert httpx.get(http.url + "/health").status_code == 503
            events = [first] + [line for line in lines if line]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks) == "A" * 20
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert app.state.server.drained.wait(10)
        http.thread.join(10)
        assert not http.thread.is_alive() and not http.server.force_exit   # exited once drained
    finally:
        http.stop()


def test_reasoning_and_tool_calls_over_http(engine):
    """A scripted answer (thinking, then a tool call) comes back split into reasoning_content and tool_calls,
    streamed and not; the tools reach the chat template."""
    script = ["Let", " me", " think", "</th", "ink>", "\n\n", "<tool", "_call>\n", '{"name": "get_weather", ',
              '"arguments": {"city": "Paris"}}', "\n</tool_call>"]
    http = ServerThread(create_app(FakeCore(max_queue=8, delay=0, script=script, finish="stop"), engine, MODEL))
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object", "properties": {"city": {}}}}}]
    request = {"model": MODEL, "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": tools,
               "extra_body": {"return_token_ids": True}}
    try:
        reply = http.client.chat.completions.create(**request)
        message, choice = reply.choices[0].message, reply.choices[0]
        assert message.reasoning_content == "Let me think" and message.content is None
        assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == \
            [("get_weather", {"city": "Paris"})]
        assert message.tool_calls[0].id.startswith("call_") and choice.finish_reason == "tool_calls"
        assert "get_weather" in engine.tokenizer.decode(reply.prompt_token_ids)   # rendered by the template
        reasoning, content, calls, finish = "", "", [], None
        for chunk in http.client.chat.completions.create(**request, stream=True):
            delta = chunk.choices[0].delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += delta.content or ""
            calls += delta.tool_calls or []
            finish = chunk.choices[0].finish_reason or finish
        assert (reasoning, content, finish) == ("Let me think", "", "tool_calls")
        assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == \
            [(0, "get_weather", {"city": "Paris"})]
        plain = http.client.chat.completions.create(
            **{**request, "tools": None, "extra_body": {"chat_template_kwargs": {"enable_thinking": False}}})
        assert plain.choices[0].message.content == "".join(script) and plain.choices[0].finish_reason == "stop"
        assert plain.choices[0].message.reasoning_content is None
    finally:
        http.stop()
