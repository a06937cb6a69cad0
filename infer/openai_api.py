"""OpenAI-compatible requests: JSON body -> a validated request; every refusal is an `APIError` naming the field.

    body = parse_json(raw_bytes)
    req = parse_chat(body, served_model="qwen3.5", vocab_size=248320)     # or parse_completion(...)
    params = req.sampling_params(prompt_len, max_len, "messages")         # SamplingParams for one choice

Fields and defaults follow vLLM's OpenAI server: absent sampling fields take SamplingParams' defaults
(temperature 1.0, ...); max_tokens (or max_completion_tokens) defaults to what the context leaves
(max_len - prompt tokens); top_k -1 or 0 is off; `ignore_eos`, `stop_token_ids`, `return_token_ids`,
`chat_template_kwargs` and `add_generation_prompt` are vLLM's extensions. n > 1 runs n requests with seeds
seed, seed + 1, ... (independent random seeds when no seed is given).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

from infer.sampling import SamplingParams

N_MAX = 16                    # choices per request (n x prompts for batched completions)
TOP_LOGPROBS_MAX = 20
SEED_RANGE = (-2**63, 2**63)  # int64: what the sampler's PRNG key takes
ROLES = ("system", "developer", "user", "assistant", "tool")
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                   "repetition_penalty")
# Fields with an effect this server cannot honour: refused (400) rather than silently ignored.
UNSUPPORTED = {"logit_bias": "logit_bias", "functions": "functions (use tools)", "function_call":
               "function_call (use tool_choice)", "suffix": "suffix", "audio": "audio output",
               "prediction": "predicted outputs", "guided_json": "guided decoding", "guided_regex": "guided decoding",
               "guided_choice": "guided decoding", "guided_grammar": "guided decoding"}


class APIError(Exception):
    """An HTTP error with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {_kind(body)}")
    return body


# ---- typed field access ------------------------------------------------------------------------------
def _kind(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


KINDS = {"int": ((int,), "an integer"), "number": ((int, float), "a number"), "bool": ((bool,), "a boolean"),
         "str": ((str,), "a string"), "list": ((list,), "an array"), "dict": ((dict,), "an object")}


def is_kind(value, kind: str) -> bool:
    return isinstance(value, KINDS[kind][0]) and (kind == "bool" or not isinstance(value, bool))


def field(body: dict, name: str, kind: str, default=None, check=None, expected: str = "", param: str | None = None):
    """body[name] if present and not null, checked to be of `kind` and to satisfy `check` (else APIError)."""
    value = body.get(name)
    param = param or name
    if value is None:
        return default
    if not is_kind(value, kind):
        raise APIError(f"{param}: expected {KINDS[kind][1]}, got {_kind(value)}", param)
    if kind == "number" and not (abs(value) < 1e30 and math.isfinite(value)):
        raise APIError(f"{param}={value!r}: expected a finite number", param)
    if check is not None and not check(value):
        raise APIError(f"{param}={value!r}: expected {expected}", param)
    return value


def check_model(body: dict, served_model: str) -> None:
    model = field(body, "model", "str")
    if model is not None and model != served_model:
        raise APIError(f"The model `{model}` does not exist. This server serves `{served_model}`.", "model",
                       status=404, type="NotFoundError", code="model_not_found")


def check_unsupported(body: dict) -> None:
    for name, what in UNSUPPORTED.items():
        if body.get(name) not in (None, {}, []):
            raise APIError(f"{name}: {what} is not supported by this server", name)
    fmt = field(body, "response_format", "dict")
    if fmt is not None and fmt.get("type", "text") != "text":
        raise APIError(f"response_format.type={fmt.get('type')!r}: only 'text' is supported", "response_format")


# ---- the part every request shares ---------------------------------------------------------------------
@dataclasses.dataclass
class GenerationOptions:
    """Validated sampling and output options of one request (the prompt length decides max_tokens later)."""

    sampling: dict                        # SamplingParams keyword arguments (no max_new_tokens, no seed)
    max_tokens: int | None
    seed: int | None
    n: int
    logprobs: int | None                  # top alternatives per token (0: the sampled token's only); None: off
    stream: bool
    include_usage: bool
    return_token_ids: bool

    def sampling_params(self, prompt_len: int, max_len: int, prompt_param: str, choice: int = 0) -> SamplingParams:
        """SamplingParams of choice `choice` for a prompt of `prompt_len` tokens in a context of max_len."""
        if prompt_len == 0:
            raise APIError(f"{prompt_param}: the prompt is empty (0 tokens)", prompt_param)
        if prompt_len >= max_len:
            raise APIError(f"This model's maximum context length is {max_len} tokens. However, your "
                           f"{prompt_param} resulted in {prompt_len} tokens, which leaves no room to generate "
                           f"(at most {max_len - 1}).", prompt_param)
        room = max_len - prompt_len
        if self.max_tokens is not None and self.max_tokens > room:
            raise APIError(f"max_tokens={self.max_tokens} is too large: the prompt has {prompt_len} tokens and "
                           f"the context is {max_len}, which leaves room for {room}.", "max_tokens")
        seed = None if self.seed is None else self.seed + choice
        return SamplingParams(max_new_tokens=self.max_tokens or room, seed=seed, **self.sampling)


def parse_options(body: dict, vocab_size: int, logprobs: int | None) -> GenerationOptions:
    """The sampling / output fields shared by chat and completions (logprobs parsed by the caller)."""
    check_unsupported(body)
    sampling = {}
    checks = {"temperature": (lambda v: v >= 0, ">= 0 (0 is greedy)"), "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
              "min_p": (lambda v: 0 <= v <= 1, "in [0, 1]"), "repetition_penalty": (lambda v: v > 0, "> 0"),
              "presence_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]"),
              "frequency_penalty": (lambda v: -2 <= v <= 2, "in [-2, 2]")}
    for name, (check, expected) in checks.items():
        value = field(body, name, "number", check=check, expected=expected)
        if value is not None:
            sampling[name] = float(value)
    top_k = field(body, "top_k", "int", check=lambda v: -1 <= v < 2**31,
                  expected="an integer >= 1, or 0 or -1 (off)")
    if top_k is not None:
        sampling["top_k"] = max(top_k, 0)
    sampling["stop"] = parse_stop(body)
    stop_ids = field(body, "stop_token_ids", "list", default=[])
    if not all(is_kind(t, "int") and 0 <= t < vocab_size for t in stop_ids):
        raise APIError(f"stop_token_ids: expected token ids in [0, {vocab_size})", "stop_token_ids")
    sampling["stop_token_ids"] = tuple(stop_ids)
    sampling["ignore_eos"] = field(body, "ignore_eos", "bool", default=False)
    max_tokens = field(body, "max_completion_tokens", "int", check=lambda v: v >= 1, expected="an integer >= 1")
    if max_tokens is None:
        max_tokens = field(body, "max_tokens", "int", check=lambda v: v >= 1, expected="an integer >= 1")
    n = field(body, "n", "int", default=1, check=lambda v: 1 <= v <= N_MAX, expected=f"an integer in [1, {N_MAX}]")
    seed = field(body, "seed", "int", check=lambda v: SEED_RANGE[0] <= v < SEED_RANGE[1] - N_MAX,
                 expected="a 64-bit signed integer")
    best_of = field(body, "best_of", "int")
    if best_of is not None and best_of != n:
        raise APIError(f"best_of={best_of}: only best_of == n is supported", "best_of")
    stream = field(body, "stream", "bool", default=False)
    stream_options = field(body, "stream_options", "dict")
    if stream_options is not None and not stream:
        raise APIError("stream_options: only allowed with stream: true", "stream_options")
    include_usage = field(stream_options or {}, "include_usage", "bool", default=False,
                          param="stream_options.include_usage")
    return GenerationOptions(sampling, max_tokens, seed, n, logprobs, stream, include_usage,
                             field(body, "return_token_ids", "bool", default=False))


def parse_stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise APIError("stop: expected a non-empty string or an array of non-empty strings", "stop")
    return tuple(stops)


# ---- /v1/chat/completions --------------------------------------------------------------------------------
@dataclasses.dataclass
class ChatRequest:
    messages: list[dict]                  # as the chat template takes them (content: text, or parts with images)
    tools: list[dict] | None
    parse_tools: bool                     # tools given and tool_choice is not "none"
    template_kwargs: dict                 # chat_template_kwargs + add_generation_prompt
    options: GenerationOptions

    @property
    def thinking(self) -> bool:
        """False when the request switched thinking off (chat_template_kwargs enable_thinking false)."""
        return self.template_kwargs.get("enable_thinking", True) is not False


def parse_chat(body: dict, served_model: str, vocab_size: int) -> ChatRequest:
    check_model(body, served_model)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise APIError("messages: expected a non-empty array of messages" if raw is None or isinstance(raw, list)
                       else f"messages: expected an array, got {_kind(raw)}", "messages")
    messages = [parse_message(m, i) for i, m in enumerate(raw)]
    tools = parse_tools(body)
    tool_choice = body.get("tool_choice", "auto") or "auto"
    if tool_choice not in ("auto", "none"):
        raise APIError(f"tool_choice={tool_choice!r}: only 'auto' and 'none' are supported", "tool_choice")
    kwargs = dict(field(body, "chat_template_kwargs", "dict", default={}))
    for reserved in ("messages", "tools"):
        if reserved in kwargs:
            raise APIError(f"chat_template_kwargs.{reserved}: set it as a request field", "chat_template_kwargs")
    kwargs.setdefault("add_generation_prompt", field(body, "add_generation_prompt", "bool", default=True))
    logprobs = field(body, "logprobs", "bool", default=False)
    top = field(body, "top_logprobs", "int", check=lambda v: 0 <= v <= TOP_LOGPROBS_MAX,
                expected=f"an integer in [0, {TOP_LOGPROBS_MAX}]")
    if top is not None and not logprobs:
        raise APIError("top_logprobs: requires logprobs: true", "top_logprobs")
    options = parse_options(body, vocab_size, (top or 0) if logprobs else None)
    return ChatRequest(messages, tools, bool(tools) and tool_choice != "none", kwargs, options)


def parse_message(message, i: int) -> dict:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise APIError(f"{where}: expected an object, got {_kind(message)}", where)
    role = message.get("role")
    if role not in ROLES:
        raise APIError(f"{where}.role={role!r}: expected one of {', '.join(ROLES)}", f"{where}.role")
    out = {k: v for k, v in message.items() if k not in ("content", "tool_calls")}
    out["content"] = message_text(message.get("content"), f"{where}.content",
                                  allow_null=role == "assistant")
    if message.get("tool_calls") is not None:
        out["tool_calls"] = parse_message_tool_calls(message["tool_calls"], f"{where}.tool_calls")
    return out


def message_text(content, where: str, allow_null: bool) -> str | list[dict]:
    """A message's content: a string, or an array of {"type": "text", "text": ...} parts (joined by newlines, as
    vLLM does); with {"type": "image_url", "image_url": {"url": ...}} parts (a data URL or a local file, for
    models with a vision tower) the array of parts in order. null only for assistant messages (e.g. with
    tool_calls)."""
    if content is None and allow_null:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(f"{where}: expected a string or an array of content parts, got {_kind(content)}", where)
    for j, part in enumerate(content):
        text = isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        image = isinstance(part, dict) and part.get("type") == "image_url" and _image_url(part) is not None
        if not (text or image):
            raise APIError(f"{where}[{j}]: expected a {{\"type\": \"text\", \"text\": ...}} or "
                           "{\"type\": \"image_url\", \"image_url\": {\"url\": ...}} part", f"{where}[{j}]")
    if any(part["type"] == "image_url" for part in content):
        return [{"type": "image_url", "image_url": {"url": _image_url(p)}} if p["type"] == "image_url"
                else {"type": "text", "text": p["text"]} for p in content]
    return "\n".join(part["text"] for part in content)


def _image_url(part: dict) -> str | None:
    """The url of an image_url part ({"url": str} or, as some clients send, a bare string), else None."""
    value = part.get("image_url")
    value = value.get("url") if isinstance(value, dict) else value
    return value if isinstance(value, str) else None


def has_images(messages: list[dict]) -> bool:
    """Whether any parsed message carries image parts (its content is then a list of parts)."""
    return any(isinstance(m.get("content"), list) for m in messages)


def parse_message_tool_calls(calls, where: str) -> list[dict]:
    """Earlier assistant tool calls for the template, arguments parsed to objects (as vLLM passes them)."""
    if not isinstance(calls, list):
        raise APIError(f"{where}: expected an array, got {_kind(calls)}", where)
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise APIError(f"{where}[{j}].function: expected an object with a string name", f"{where}[{j}].function")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise APIError(f"{where}[{j}].function.arguments: not valid JSON", f"{where}[{j}].function.arguments")
        out.append({**call, "function": {**function, "arguments": arguments}})
    return out


def parse_tools(body: dict) -> list[dict] | None:
    tools = field(body, "tools", "list")
    if not tools:
        return None
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str) or not function["name"]:
            raise APIError(f"tools[{i}]: expected {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                           "\"parameters\": {...}}}", f"tools[{i}]")
    return tools


# ---- /v1/completions -------------------------------------------------------------------------------------
@dataclasses.dataclass
class CompletionRequest:
    prompts: list[str | list[int]]        # text or token ids, one per prompt
    options: GenerationOptions


def parse_completion(body: dict, served_model: str, vocab_size: int) -> CompletionRequest:
    check_model(body, served_model)
    prompts = parse_prompts(body.get("prompt"), vocab_size)
    if field(body, "echo", "bool", default=False):
        raise APIError("echo: echoing the prompt is not supported by this server", "echo")
    logprobs = field(body, "logprobs", "int", check=lambda v: 0 <= v <= TOP_LOGPROBS_MAX,
                     expected=f"an integer in [0, {TOP_LOGPROBS_MAX}]")
    options = parse_options(body, vocab_size, logprobs)
    if len(prompts) * options.n > N_MAX:
        raise APIError(f"{len(prompts)} prompts x n={options.n} choices: at most {N_MAX} per request", "n")
    return CompletionRequest(prompts, options)


def parse_prompts(prompt, vocab_size: int) -> list[str | list[int]]:
    """A string, an array of token ids, or an array of either (a batch)."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(is_kind(t, "int") for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
    else:
        raise APIError("prompt: expected a string, an array of token ids, or a non-empty array of either"
                       + ("" if prompt is not None else " (missing)"), "prompt")
    for i, p in enumerate(prompts):
        if isinstance(p, list) and not all(is_kind(t, "int") and 0 <= t < vocab_size for t in p):
            raise APIError(f"prompt{'' if len(prompts) == 1 else f'[{i}]'}: expected token ids in [0, {vocab_size})",
                           "prompt")
    return prompts


def sampling_field_of(error: ValueError) -> str | None:
    """The request field behind a SamplingParams ValueError ("SamplingParams.top_p=..." -> "top_p")."""
    match = re.search(r"SamplingParams\.(\w+)", str(error))
    name = match.group(1) if match else None
    return {"max_new_tokens": "max_tokens"}.get(name, name)
