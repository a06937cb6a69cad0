"""Qwen3.5 output parsing as vLLM serves it: reasoning (`<think>...</think>`) and tool calls
(`<tool_call>{json}</tool_call>`).

Both parsers are streaming (text arrives in pieces that may split a tag anywhere) and the non-streaming results
are the same parsers fed the whole text at once, so a streamed answer always joins up to the non-streamed one:

    reasoning = ReasoningParser(in_reasoning=True)       # the generation prompt ended with "<think>\\n"
    tools = ToolCallParser()
    for piece in pieces:
        thought, text = reasoning.feed(piece)
        text, calls = tools.feed(text)                    # calls: [{"name": str, "arguments": str}, ...]
"""

from __future__ import annotations

import json

THINK_START, THINK_END = "<think>", "</think>"
TOOL_START, TOOL_END = "<tool_call>", "</tool_call>"


def partial_tag(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (a tag that may be arriving)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def prompt_opens_reasoning(prompt: str) -> bool:
    """True when the rendered prompt ends inside an open think block (its last `<think>` is after its last
    `</think>`), as Qwen3.5's thinking generation prompt `<|im_start|>assistant\\n<think>\\n` does."""
    return prompt.rfind(THINK_START) > prompt.rfind(THINK_END)


class ReasoningParser:
    """Splits generated text into (reasoning, content) deltas.

    in_reasoning: the prompt left a think block open, so the output starts as reasoning and may contain only
    `</think>`. Otherwise a `<think>` at the very start of the output (after whitespace) opens one. With
    enabled=False (`chat_template_kwargs: {"enable_thinking": false}`) everything is content.
    start_id / end_id: the tags' token ids, for tokenizers whose decoded text drops them (special tokens)."""

    def __init__(self, in_reasoning: bool = False, enabled: bool = True, start_id: int | None = None,
                 end_id: int | None = None):
        self.state = "content" if not enabled else ("reasoning" if in_reasoning else "start")
        self.start_id, self.end_id = start_id, end_id
        self.buffer = ""
        self.saw_reasoning = self.state == "reasoning"

    def feed(self, text: str, token_id: int | None = None) -> tuple[str, str]:
        """Adds a piece of output; returns (reasoning delta, content delta)."""
        if self.state == "content":
            return "", text
        self.buffer += text
        if self.state == "start":
            stripped = self.buffer.lstrip()
            if stripped.startswith(THINK_START) or (token_id is not None and token_id == self.start_id):
                self.state, self.saw_reasoning = "reasoning", True
                self.buffer = stripped[len(THINK_START):] if stripped.startswith(THINK_START) else stripped
            elif THINK_START.startswith(stripped):
                return "", ""                     # whitespace or a "<think>" still arriving
            else:
                self.state, text, self.buffer = "content", self.buffer, ""
                return "", text
        return self._reasoning(token_id)

    def _reasoning(self, token_id: int | None) -> tuple[str, str]:
        end = self.buffer.find(THINK_END)
        if end >= 0:
            thought, rest = self.buffer[:end], self.buffer[end + len(THINK_END):]
            self.state, self.buffer = "content", ""
            return thought, rest
        if token_id is not None and token_id == self.end_id:   # the tag's text was skipped by the decoder
            thought, self.state, self.buffer = self.buffer, "content", ""
            return thought, ""
        keep = partial_tag(self.buffer, THINK_END)
        thought, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
        return thought, ""

    def finish(self) -> tuple[str, str]:
        """The held-back text at the end of the output: reasoning if a think block is still open."""
        rest, self.buffer = self.buffer, ""
        if self.state == "reasoning":
            return rest, ""
        self.state = "content"
        return "", rest


class ToolCallParser:
    """Pulls `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks out of content.

    Text outside blocks passes through (a possible tag start is held back; trailing whitespace is held until
    more text follows, and dropped at the end once a call was made). A block is returned whole when it closes;
    one that is not a JSON object with a string "name", or is still open at the end, comes back as text."""

    def __init__(self):
        self.buffer, self.pending_space = "", ""
        self.in_call = False
        self.calls = 0

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """Adds content; returns (content delta, calls completed now: [{"name", "arguments" (JSON text)}])."""
        self.buffer += text
        out, calls = [], []
        while True:
            tag = TOOL_END if self.in_call else TOOL_START
            at = self.buffer.find(tag)
            if at < 0:
                break
            before, self.buffer = self.buffer[:at], self.buffer[at + len(tag):]
            if not self.in_call:
                out.append(self._text(before))
            else:
                call = parse_tool_call(before)
                if call is None:
                    out.append(self._text(TOOL_START + before + TOOL_END))
                else:
                    calls.append(call)
                    self.calls += 1
            self.in_call = not self.in_call
        if not self.in_call:
            keep = partial_tag(self.buffer, TOOL_START)
            out.append(self._text(self.buffer[:len(self.buffer) - keep]))
            self.buffer = self.buffer[len(self.buffer) - keep:]
        return "".join(out), calls

    def _text(self, text: str) -> str:
        """Text to pass on now; trailing whitespace waits (it is dropped if a call follows and ends the output)."""
        body = text.rstrip()
        if not body:
            self.pending_space += text
            return ""
        text, self.pending_space = self.pending_space + body, text[len(body):]
        return text

    def finish(self) -> tuple[str, list[dict]]:
        rest = (TOOL_START if self.in_call else "") + self.buffer
        self.buffer, self.in_call = "", False
        text = self._text(rest) + ("" if self.calls else self.pending_space)
        self.pending_space = ""
        return text, []


def parse_tool_call(block: str) -> dict | None:
    """'{"name": "f", "arguments": {...}}' -> {"name": "f", "arguments": '{...}'} (None if malformed)."""
    try:
        call = json.loads(block)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", call.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"name": call["name"], "arguments": arguments}


def parse_reasoning(text: str, in_reasoning: bool = False, enabled: bool = True) -> tuple[str | None, str]:
    """Non-streaming: (reasoning or None when there was no think block, content)."""
    parser = ReasoningParser(in_reasoning, enabled)
    thought, content = parser.feed(text)
    more_thought, more_content = parser.finish()
    return (thought + more_thought if parser.saw_reasoning else None), content + more_content


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """Non-streaming: (content outside the blocks, calls)."""
    parser = ToolCallParser()
    content, calls = parser.feed(text)
    more, _ = parser.finish()
    return content + more, calls
