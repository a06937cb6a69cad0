"""OpenAI-compatible responses: per-choice state that turns engine outputs into deltas, and the JSON builders.

    choice = ChatChoice(0, ReasoningParser(in_reasoning=True), ToolCallParser(), token_text=None)
    streamed = choice.add(outputs)          # {"index", "delta", "logprobs", "finish_reason"} or None
    final = choice.message()                # {"index", "message", "logprobs", "finish_reason"}

With return_token_ids (vLLM's extension) each choice carries `token_ids` (in streaming: the ids of that chunk)
and the response `prompt_token_ids` (in streaming: on the first chunk).
"""

from __future__ import annotations

import json
import uuid

from infer.chat_parsing import ReasoningParser, ToolCallParser

FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class TokenText:
    """Token id -> its text (cached), for logprobs."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            self.cache[token_id] = "" if self.tokenizer is None else self.tokenizer.decode([token_id])
        return self.cache[token_id]


class _Choice:
    """What chat and completion choices share: token ids, completion tokens, the finish reason."""

    def __init__(self, index: int, token_text: TokenText | None, return_token_ids: bool):
        self.index, self.token_text, self.return_token_ids = index, token_text, return_token_ids
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.failed = False

    def _take(self, out) -> bool:
        """Records one output; False for an output that carries no token (an engine error, a cancellation)."""
        if out.finish_reason is not None:
            self.finish_reason = FINISH_REASONS.get(out.finish_reason, out.finish_reason)
            self.failed = out.finish_reason == "error"
        if out.token_id < 0 or out.finish_reason in ("error", "cancelled"):
            return False
        self.token_ids.append(out.token_id)
        return True

    def _extras(self, choice: dict, ids: list[int]) -> dict:
        if self.return_token_ids:
            choice["token_ids"] = ids
        return choice


class ChatChoice(_Choice):
    def __init__(self, index: int, reasoning: ReasoningParser, tools: ToolCallParser | None,
                 token_text: TokenText | None = None, return_token_ids: bool = False):
        super().__init__(index, token_text, return_token_ids)
        self.reasoning_parser, self.tool_parser = reasoning, tools
        self.reasoning, self.content, self.tool_calls, self.logprobs = [], [], [], []

    def add(self, outputs) -> dict | None:
        """Takes outputs in order; returns the streamed choice for them (None when there is nothing to send)."""
        start_ids, start_calls, start_lp = len(self.token_ids), len(self.tool_calls), len(self.logprobs)
        reasoning, content = [], []
        for out in outputs:
            took = self._take(out)
            if took and self.token_text is not None:
                self.logprobs.append(self._logprob(out))
            text = out.text if took else ""
            thought, said = self.reasoning_parser.feed(text, out.token_id)
            if out.finish_reason is not None:
                more_thought, more_said = self.reasoning_parser.finish()
                thought, said = thought + more_thought, said + more_said
            said = self._tools(said, out.finish_reason is not None)
            reasoning.append(thought)
            content.append(said)
        self.reasoning += reasoning
        self.content += content
        if self.tool_calls and self.finish_reason == "stop":
            self.finish_reason = "tool_calls"
        delta = {}
        if "".join(reasoning):
            delta["reasoning_content"] = "".join(reasoning)
        if "".join(content):
            delta["content"] = "".join(content)
        if len(self.tool_calls) > start_calls:
            delta["tool_calls"] = [{"index": k, **call} for k, call in
                                   enumerate(self.tool_calls) if k >= start_calls]
        done = any(out.finish_reason is not None for out in outputs)
        if not delta and not done and not self.return_token_ids and self.token_text is None:
            return None
        logprobs = {"content": self.logprobs[start_lp:]} if self.token_text is not None else None
        return self._extras({"index": self.index, "delta": delta, "logprobs": logprobs,
                             "finish_reason": self.finish_reason if done else None}, self.token_ids[start_ids:])

    def _tools(self, text: str, final: bool) -> str:
        if self.tool_parser is None:
            return text
        text, calls = self.tool_parser.feed(text)
        if final:
            more, _ = self.tool_parser.finish()
            text += more
        self.tool_calls += [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": call}
                            for call in calls]
        return text

    def _logprob(self, out) -> dict:
        def entry(token_id, logprob):
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
        return {**entry(out.token_id, out.logprob),
                "top_logprobs": [entry(t, lp) for t, lp in (out.top_logprobs or [])]}

    def message(self) -> dict:
        reasoning, content = "".join(self.reasoning), "".join(self.content)
        message = {"role": "assistant", "content": content if content or not (self.tool_calls or reasoning) else None,
                   "reasoning_content": reasoning if self.reasoning_parser.saw_reasoning else None,
                   "tool_calls": self.tool_calls}
        logprobs = {"content": self.logprobs} if self.token_text is not None else None
        return self._extras({"index": self.index, "message": message, "logprobs": logprobs,
                             "finish_reason": self.finish_reason}, self.token_ids)


class CompletionChoice(_Choice):
    def __init__(self, index: int, token_text: TokenText | None = None, return_token_ids: bool = False):
        super().__init__(index, token_text, return_token_ids)
        self.text, self.tokens, self.token_logprobs, self.top_logprobs, self.offsets = "", [], [], [], []

    def add(self, outputs) -> dict | None:
        start_ids, start_lp, start_text = len(self.token_ids), len(self.tokens), len(self.text)
        for out in outputs:
            if not self._take(out):
                continue
            if self.token_text is not None:
                self.offsets.append(len(self.text))
                self.tokens.append(self.token_text(out.token_id))
                self.token_logprobs.append(out.logprob)
                top = {self.token_text(t): lp for t, lp in (out.top_logprobs or [])}
                self.top_logprobs.append({self.tokens[-1]: out.logprob, **top})
            self.text += out.text
        done = any(out.finish_reason is not None for out in outputs)
        if len(self.text) == start_text and not done and not self.return_token_ids and self.token_text is None:
            return None
        return self._extras({"index": self.index, "text": self.text[start_text:],
                             "logprobs": self._logprobs(start_lp),
                             "finish_reason": self.finish_reason if done else None}, self.token_ids[start_ids:])

    def _logprobs(self, start: int) -> dict | None:
        if self.token_text is None:
            return None
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top_logprobs[start:], "text_offset": self.offsets[start:]}

    def final(self) -> dict:
        return self._extras({"index": self.index, "text": self.text, "logprobs": self._logprobs(0),
                             "finish_reason": self.finish_reason}, self.token_ids)


def response(kind: str, rid: str, created: int, model: str, choices: list[dict], **extra) -> dict:
    """A response object: kind "chat.completion", "chat.completion.chunk" or "text_completion"."""
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": choices, **extra}
