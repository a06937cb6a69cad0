"""Training data: JSONL files -> token ids with loss flags -> rows packed to a fixed length -> batches.

A JSONL line is `{"text": str}` (learn every token), `{"prompt": str, "completion": str}` (plain text, learn only
the completion, as TRL's prompt-completion format) or `{"messages": [{"role", "content", ...}, ...]}` (a chat,
rendered with the tokenizer's chat template; learn only the assistant replies). Documents are packed greedily
into rows of `seq_len` tokens; `segment_ids` keep documents apart (attention and targets never cross them).
Conversations with image / video parts become vision rows (`train.vision_data`) when the model has a vision tower.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import numpy as np

from qwen35_jax.tokenizer import TokenizerError
from qwen35_jax.vision.chat import has_media

ROW_FIELDS = ("input_ids", "positions", "segment_ids", "targets", "loss_mask")


class DataError(ValueError):
    """Training data that cannot be used; the message names the file and line (or the document)."""


class HistoryRewritten(DataError):
    """The chat template renders earlier turns differently once a later turn follows (Qwen3.5's drops the
    reasoning of assistant turns before the last user turn), so one turn-by-turn mask cannot exist."""


def _at(where: str) -> str:
    return f"{where}: " if where else ""


# ---- reading -------------------------------------------------------------------------------------------
KINDS = ("text", "prompt", "messages")  # the field that decides an example's kind


def _check_example(example, where: str) -> None:
    """Raises DataError unless `example` is {"text": str}, {"prompt": str, "completion": str} or
    {"messages": [{"role": str, ...}, ...]}."""
    if not isinstance(example, dict):
        raise DataError(f"{_at(where)}expected a JSON object, got {type(example).__name__}")
    kinds = [k for k in KINDS if k in example]
    if not kinds:
        raise DataError(f"{_at(where)}expected a 'text', 'prompt'/'completion' or 'messages' field (got keys "
                        f"{sorted(example)})")
    if len(kinds) > 1:
        raise DataError(f"{_at(where)}expected one of the fields {list(KINDS)}, got {kinds}")
    has_messages = kinds[0] == "messages"
    fields = {"text": ("text",), "prompt": ("prompt", "completion"), "messages": ()}[kinds[0]]
    for field in fields:
        if field not in example:
            raise DataError(f"{_at(where)}a 'prompt' example needs a 'completion' field")
        if not isinstance(example[field], str):
            raise DataError(f"{_at(where)}'{field}' must be a string, got {type(example[field]).__name__}")
    if has_messages:
        messages = example["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{_at(where)}'messages' must be a non-empty list of message objects")
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise DataError(f"{_at(where)}messages[{k}] must be an object with a string 'role'")


def _read_lines(path: Path) -> list[tuple[int, dict]]:
    """(1-based line number, example) for each non-blank line of a JSONL file, each one checked."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the data file ({e.strerror or e})") from None
    examples = []
    for number, line in enumerate(raw.splitlines(), start=1):
        where = f"{path}:{number}"
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not valid UTF-8 ({e})") from None
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON ({e})") from None
        _check_example(example, where)
        examples.append((number, example))
    return examples


def read_jsonl(path: str | Path) -> list[dict]:
    """The examples of a JSONL file (blank lines skipped); DataError names the file and line of a bad one."""
    return [example for _, example in _read_lines(Path(path))]


# ---- tokenizing ----------------------------------------------------------------------------------------
def _render(tokenizer, messages: list[dict], add_generation_prompt: bool, chat_kwargs: dict, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                             **chat_kwargs)
    except (TokenizerError, jinja2.TemplateError, TypeError) as e:
        raise DataError(f"{_at(where)}the chat template failed on this conversation ({e})") from None


def _reply_start(prompt: str, full: str, consumed: int) -> int:
    """Where the assistant reply starts in `full` (the render through that reply), given `prompt` (the render
    before it with the generation prompt). Normally `full` extends `prompt`. Some templates open the generation
    prompt differently from a stored reply (e.g. `<think>\\n` for a reply without reasoning): then the reply
    starts after the last newline the two share (the end of the `<|im_start|>assistant\\n` header)."""
    if full.startswith(prompt):
        return len(prompt)
    shared = consumed
    while shared < min(len(prompt), len(full)) and prompt[shared] == full[shared]:
        shared += 1
    newline = full.rfind("\n", consumed, shared)
    return newline + 1 if newline >= 0 else shared


def _rewrite_error(where: str, k: int) -> DataError:
    return HistoryRewritten(f"{_at(where)}the chat template renders the conversation through messages[{k}] so that it "
                     "does not extend the render of the earlier turns (it rewrites history, e.g. drops the "
                     "reasoning of earlier assistant turns), so the loss mask cannot be built turn by turn; "
                     "split the conversation into one example per assistant turn (load_dataset does)")


def _chat_pieces(messages: list[dict], tokenizer, chat_kwargs: dict, where: str) -> list[tuple[str, bool]]:
    """The conversation's render cut into (text, learn) pieces: learn=True exactly on the assistant replies
    (each with its end-of-turn token), everything else (system, user, headers, generation prompts) False."""
    pieces, consumed = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True, chat_kwargs, where)
        full = _render(tokenizer, messages[:i + 1], False, chat_kwargs, where)
        if not (prompt.startswith(consumed) and full.startswith(consumed)):
            raise _rewrite_error(where, i)
        start = _reply_start(prompt, full, len(consumed))
        pieces += [(full[len(consumed):start], False), (full[start:], True)]
        consumed = full
    if not pieces:
        raise DataError(f"{_at(where)}the conversation has no assistant message, so nothing to learn")
    whole = _render(tokenizer, messages, False, chat_kwargs, where)
    if not whole.startswith(consumed):
        raise _rewrite_error(where, len(messages) - 1)
    return pieces + [(whole[len(consumed):], False)]


def tokenize_example(example: dict, tokenizer, add_eos: bool = True, chat_kwargs: dict | None = None,
                     where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [n], learn bool [n]): learn[t] is True where the model should learn to predict token t.

    `text`: every token, plus the tokenizer's first EOS id when `add_eos`. `prompt` + `completion`: the two
    tokenized separately (the prompt exactly as a generation request would be), learning only the completion
    and the EOS. `messages`: the chat template's
    render, learning only the assistant replies (`chat_kwargs`, e.g. {"enable_thinking": False}, go to the
    template). Each piece is tokenized on its own, so the mask is exact. `where` (e.g. "data.jsonl:12")
    prefixes error messages."""
    _check_example(example, where)
    eos = [tokenizer.eos_token_ids[0]] if add_eos and tokenizer.eos_token_ids else []
    if "text" in example:
        ids = tokenizer.encode(example["text"]) + eos
        return np.asarray(ids, np.int32), np.ones(len(ids), bool)
    if "prompt" in example:
        prompt, completion = tokenizer.encode(example["prompt"]), tokenizer.encode(example["completion"]) + eos
        return (np.asarray(prompt + completion, np.int32),
                np.asarray([False] * len(prompt) + [True] * len(completion), bool))
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{_at(where)}a 'messages' example needs a tokenizer with a chat template; this one "
                        "has none")
    pieces = _chat_pieces(example["messages"], tokenizer, chat_kwargs or {}, where)
    tokens = [(tokenizer.encode(text), learn) for text, learn in pieces if text]
    ids = np.asarray([i for piece, _ in tokens for i in piece], np.int32)
    learn = np.asarray([flag for piece, flag in tokens for _ in piece], bool)
    return ids, learn


# ---- packing -------------------------------------------------------------------------------------------
def _split(ids: np.ndarray, learn: np.ndarray, seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A document of n tokens as pieces of <= seq_len tokens overlapping by one: piece j covers
    [j*(seq_len-1), j*(seq_len-1)+seq_len), so each (token, next token) pair lies in exactly one piece."""
    stride = seq_len - 1
    return [(ids[s:s + seq_len], learn[s:s + seq_len]) for s in range(0, len(ids) - 1, stride)]


def _pieces(docs, seq_len: int, overflow: str, where) -> list[tuple[np.ndarray, np.ndarray]]:
    """The segments to pack, in order; documents shorter than 2 tokens (nothing to predict) are dropped."""
    if overflow not in ("split", "reject"):
        raise DataError(f"overflow must be 'split' or 'reject', got {overflow!r}")
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2, got {seq_len}")
    pieces = []
    for k, (ids, learn) in enumerate(docs):
        ids, learn = np.asarray(ids, np.int32), np.asarray(learn, bool)
        if len(ids) < 2:
            continue
        if len(ids) <= seq_len:
            pieces.append((ids, learn))
        elif overflow == "split":
            pieces += _split(ids, learn, seq_len)
        else:
            name = where[k] if where else f"document {k}"
            raise DataError(f"{name}: {len(ids)} tokens, longer than seq_len {seq_len} (overflow='reject'; "
                            "use overflow='split' to cut it, or a larger seq_len)")
    return pieces


class _FirstFit:
    """Lowest-index row with at least L free slots, in O(log rows): a max tree over the rows' free space."""

    def __init__(self, max_rows: int, seq_len: int):
        self.seq_len, self.size = seq_len, 1
        while self.size < max_rows:
            self.size *= 2
        self.free = [seq_len] * (2 * self.size)  # leaves = rows (all empty); inner nodes = max of children

    def take(self, length: int) -> tuple[int, int]:
        """(row, offset) for `length` <= seq_len tokens in the first row with room; marks them used."""
        node = 1
        while node < self.size:
            node = 2 * node if self.free[2 * node] >= length else 2 * node + 1
        offset = self.seq_len - self.free[node]
        self.free[node] -= length
        row, node = node - self.size, node // 2
        while node:
            self.free[node] = max(self.free[2 * node], self.free[2 * node + 1])
            node //= 2
        return row, offset


def pack_documents(docs: list[tuple[np.ndarray, np.ndarray]], seq_len: int, overflow: str = "split",
                   where: list[str] | None = None) -> dict[str, np.ndarray]:
    """Documents (ids [n], learn [n]) packed into rows of `seq_len` tokens, greedy first-fit in the given order.

    Returns [rows, seq_len] arrays: input_ids int32, positions int32 (0.. per segment), segment_ids int32 (1.. per
    row in placement order, 0 = padding), targets int32 (the next token of the same segment, else 0), loss_mask
    float32 (1 where the target counts: same segment and its learn flag set). A document longer than seq_len is
    cut into one-token-overlapping pieces (overflow="split"; every target still counted once) or raises
    DataError naming `where[i]` (overflow="reject"). Documents under 2 tokens have no target and are dropped.
    """
    return place_pieces(_pieces(docs, seq_len, overflow, where), seq_len)[0]


def place_pieces(pieces: list[tuple[np.ndarray, np.ndarray]], seq_len: int
                 ) -> tuple[dict[str, np.ndarray], list[tuple[int, int]]]:
    """(the rows of `pack_documents`, each piece's (row, offset)) for pieces (ids [n], learn [n]) of <= seq_len
    tokens, placed first-fit in order."""
    tree = _FirstFit(len(pieces), seq_len)
    places = [tree.take(len(ids)) for ids, _ in pieces]
    num_rows = 1 + max((row for row, _ in places), default=-1)
    rows = {name: np.zeros((num_rows, seq_len), np.int32) for name in ROW_FIELDS}
    rows["loss_mask"] = np.zeros((num_rows, seq_len), np.float32)
    segments = np.zeros(num_rows, np.int32)
    for (ids, learn), (row, offset) in zip(pieces, places):
        n, span = len(ids), slice(offset, offset + len(ids))
        segments[row] += 1
        rows["input_ids"][row, span] = ids
        rows["positions"][row, span] = np.arange(n)
        rows["segment_ids"][row, span] = segments[row]
        rows["targets"][row, offset:offset + n - 1] = ids[1:]
        rows["loss_mask"][row, offset:offset + n - 1] = learn[1:]
    return rows, places


# ---- batches -------------------------------------------------------------------------------------------
class PackedDataset:
    """Packed rows served as deterministic shuffled batches.

    The row order is the concatenation over epochs e = 0, 1, ... of `default_rng([seed, e]).permutation(rows)`;
    batch `step` is entries [step*B, (step+1)*B) of it, so a run resumed at step k sees the same batches.
    With images or videos (`train.vision_data`), `media` holds each row's documents with media and the batches
    carry the encoder's inputs (`vision_config` gives their geometry)."""

    def __init__(self, rows: dict[str, np.ndarray], media: list | None = None, vision_config=None):
        missing = [name for name in ROW_FIELDS if name not in rows]
        if missing:
            raise DataError(f"packed rows lack {missing}")
        self.rows, self.media, self.vision_config = rows, media, vision_config
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.rows["input_ids"])

    @property
    def seq_len(self) -> int:
        return self.rows["input_ids"].shape[1]

    def _order(self, seed: int, epoch: int) -> np.ndarray:
        key = (seed, epoch)
        if key not in self._orders:
            if len(self._orders) > 4:
                self._orders.clear()
            self._orders[key] = np.random.default_rng([seed, epoch]).permutation(len(self))
        return self._orders[key]

    def batch(self, step: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
        """Batch `step`: each field [batch_size, seq_len]."""
        if len(self) == 0:
            raise DataError("the dataset has no rows")
        stream = step * batch_size + np.arange(batch_size)
        epochs, slots = np.divmod(stream, len(self))
        index = np.empty(batch_size, np.int64)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            index[here] = self._order(seed, int(epoch))[slots[here]]
        return self.gather(index)

    def gather(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """The batch of rows `index` (int [B]), with the encoder's inputs when the dataset has media."""
        batch = {name: values[index] for name, values in self.rows.items()}
        if self.media is not None:
            from train.vision_data import vision_batch
            batch.update(vision_batch([self.media[i] for i in index], batch["vision_index"], self.vision_config))
        return batch

    def epoch_of(self, step: int, batch_size: int) -> float:
        """Epochs consumed before batch `step` (by steps 0..step-1)."""
        return step * batch_size / len(self)


def unpacked_batch(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """tokens: int [B, L], one whole document per row -> the batch fields (every next token counted, positions
    0..L-1): what HF's `model(input_ids, labels=input_ids)` loss sees."""
    b, seq = tokens.shape
    targets = np.zeros_like(tokens, dtype=np.int32)
    targets[:, :-1] = tokens[:, 1:]
    mask = np.ones((b, seq), np.float32)
    mask[:, -1] = 0
    return {"input_ids": np.asarray(tokens, np.int32), "targets": targets, "loss_mask": mask,
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (b, seq)).copy(),
            "segment_ids": np.ones((b, seq), np.int32)}


def tokenize_examples(example: dict, tokenizer, add_eos: bool = True, chat_kwargs: dict | None = None,
                      where: str = "", vision=None) -> list:
    """`tokenize_example` as a list of documents. A conversation whose template rewrites history becomes one
    document per assistant turn: the conversation up to that turn, learning only that reply, i.e. each reply
    in exactly the context the model sees when it generates it (what Qwen3.5's reasoning template implies).
    A conversation with images or videos becomes one `train.vision_data.VisionDocument` (`vision`: a
    `VisionData`; DataError without one)."""
    if "messages" in example and has_media(example["messages"]):
        return [_vision_document(example["messages"], tokenizer, chat_kwargs or {}, where, vision)]
    try:
        return [tokenize_example(example, tokenizer, add_eos, chat_kwargs, where)]
    except HistoryRewritten:
        messages, docs = example["messages"], []
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                docs.append(_last_reply(messages[:i + 1], tokenizer, chat_kwargs or {}, f"{where} (turn {i})"))
        return docs


def _vision_document(messages: list[dict], tokenizer, chat_kwargs: dict, where: str, vision):
    from train.vision_data import tokenize_vision_chat
    if vision is None:
        raise DataError(f"{_at(where)}the conversation has images or videos, but the model has no vision tower")
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{_at(where)}a 'messages' example needs a tokenizer with a chat template; this one has none")
    try:
        return tokenize_vision_chat(messages, tokenizer, vision,
                                    lambda m: _chat_pieces(m, tokenizer, chat_kwargs, where), where)
    except HistoryRewritten:
        raise DataError(f"{_at(where)}the chat template rewrites earlier turns of this conversation with images or "
                        "videos (e.g. drops earlier reasoning), so one turn-by-turn mask cannot exist: split it into "
                        "one example per assistant turn, each with the images it needs") from None


def _last_reply(messages: list[dict], tokenizer, chat_kwargs: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The conversation ending in an assistant reply, learning only that reply."""
    prompt = _render(tokenizer, messages[:-1], True, chat_kwargs, where)
    full = _render(tokenizer, messages, False, chat_kwargs, where)
    start = _reply_start(prompt, full, 0)
    pieces = [(tokenizer.encode(full[:start]), False), (tokenizer.encode(full[start:]), True)]
    ids = np.asarray([i for piece, _ in pieces for i in piece], np.int32)
    return ids, np.asarray([flag for piece, flag in pieces for _ in piece], bool)


def load_dataset(paths: str | Path | list[str | Path], tokenizer, seq_len: int, overflow: str = "split",
                 add_eos: bool = True, chat_kwargs: dict | None = None, vision=None) -> PackedDataset:
    """JSONL files -> tokenized examples (errors name file:line) -> packed rows, in file and line order.
    vision: a `train.vision_data.VisionData` when the model has a vision tower (conversations with images or
    videos then become vision rows; without any, the rows are the text ones)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    docs, where = [], []
    for path in map(Path, paths):
        for number, example in _read_lines(path):
            new = tokenize_examples(example, tokenizer, add_eos, chat_kwargs, f"{path}:{number}", vision)
            docs += new
            where += [f"{path}:{number}"] * len(new)
    dataset = _packed(docs, seq_len, overflow, where, vision)
    if len(dataset) == 0:
        raise DataError(f"{', '.join(map(str, paths))}: no document has 2 or more tokens, nothing to train on")
    return dataset


def _packed(docs: list, seq_len: int, overflow: str, where: list[str], vision) -> PackedDataset:
    """Text documents packed as `pack_documents`; with any VisionDocument, all of them as vision rows (text
    documents split by `overflow` first)."""
    from train.vision_data import VisionDocument, pack_vision_documents, patch_dim
    if not any(isinstance(doc, VisionDocument) for doc in docs):
        return PackedDataset(pack_documents(docs, seq_len, overflow, where))
    units, names = [], []
    for doc, name in zip(docs, where):
        pieces = [doc] if isinstance(doc, VisionDocument) else [
            VisionDocument.text(ids, learn, patch_dim(vision.config))
            for ids, learn in _pieces([doc], seq_len, overflow, [name])]
        units += pieces
        names += [name] * len(pieces)
    rows, media = pack_vision_documents(units, seq_len, names)
    return PackedDataset(rows, media, vision.config)
