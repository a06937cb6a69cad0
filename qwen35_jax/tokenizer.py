"""Tokenizers of a checkpoint: HF `tokenizer.json` (via `tokenizers`) or a SentencePiece `.model`, the chat
template shipped with the checkpoint (rendered with jinja2 the way HF does), EOS ids, and an incremental
detokenizer for streaming that never splits a multi-byte character.
"""

from __future__ import annotations

import functools
import json
import warnings
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.sandbox


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be used; the message names the file."""


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """encode / decode / apply_chat_template for one checkpoint folder."""

    def __init__(self, backend, chat_template: str | None, eos_token_ids: tuple[int, ...],
                 special_tokens: dict[str, str]):
        self.backend = backend
        self.chat_template = chat_template
        self.eos_token_ids = eos_token_ids
        self.special_tokens = special_tokens  # bos_token, eos_token, pad_token, ... as text
        self._unrepresentable: set[str] = set()  # characters already warned about

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        if (folder / "tokenizer.json").exists():
            backend = _HFBackend(folder / "tokenizer.json")
        else:
            models = sorted(folder.glob("*.model"))
            if not models:
                raise TokenizerError(f"{folder}: no tokenizer.json and no SentencePiece *.model file")
            backend = _SentencePieceBackend(models[0])
        special = {k: _token_text(config[k]) for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                   if config.get(k) is not None}
        return cls(backend, _chat_template(folder, config), _eos_ids(folder, backend, special), special)

    # ---- text <-> ids --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    def encode(self, text: str) -> list[int]:
        """Text to ids; no BOS/EOS added (Qwen3.5 adds none); special-token text maps to its id.
        Characters the vocabulary cannot represent become the unknown token, with a warning (once per
        character) naming them."""
        ids = self.backend.encode(text)
        unk = self.backend.unk_id
        if unk is not None and unk in ids:
            self._warn_unrepresentable(text)
        return ids

    def _warn_unrepresentable(self, text: str) -> None:
        unk_text = self.backend.id_to_token(self.backend.unk_id)
        spans = [span for span in self.backend.unknown_text(text) if span != unk_text]
        new = sorted(set("".join(spans)) - self._unrepresentable)
        if new:
            self._unrepresentable.update(new)
            shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in new[:20])
            more = f" and {len(new) - 20} more" if len(new) > 20 else ""
            warnings.warn(f"the tokenizer cannot represent {shown}{more}: encoded as the unknown token "
                          f"{unk_text!r}", stacklevel=3)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens)

    def token_id(self, text: str) -> int | None:
        return self.backend.token_to_id(text)

    # ---- chat ----------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            enable_thinking: bool = True, tools: list[dict] | None = None, **kwargs) -> str:
        """Renders the checkpoint's chat template as HF `apply_chat_template(tokenize=False)` does."""
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat template (no chat_template.jinja and none in "
                                 "tokenizer_config.json)")
        template = _compile(self.chat_template)
        return template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                               enable_thinking=enable_thinking, **self.special_tokens, **kwargs)


def _chat_template(folder: Path, config: dict) -> str | None:
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default", next(iter(named.values()), None))
    return template


def _eos_ids(folder: Path, backend, special: dict) -> tuple[int, ...]:
    generation = _read_json(folder / "generation_config.json")
    eos = generation.get("eos_token_id")
    if eos is None and special.get("eos_token"):
        eos = backend.token_to_id(special["eos_token"])
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (eos,)


_ENVIRONMENT = None


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    """HF's environment: sandboxed, trim_blocks + lstrip_blocks, loop controls, a non-escaping tojson,
    raise_exception and strftime_now."""
    global _ENVIRONMENT
    if _ENVIRONMENT is None:
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=["jinja2.ext.loopcontrols"])

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _ENVIRONMENT = env
    return _ENVIRONMENT.from_string(source)


class _HFBackend:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer
        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise TokenizerError(f"{path}: cannot be read as a tokenizers file ({e})") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        unk = getattr(self.tok.model, "unk_token", None)  # BPE / WordPiece / WordLevel (byte-level BPE: None)
        self.unk_id = self.tok.token_to_id(unk) if isinstance(unk, str) else None

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def id_to_token(self, i):
        return self.tok.id_to_token(i)

    def unknown_text(self, text) -> list[str]:
        """The spans of `text` encoded as the unknown token."""
        encoding = self.tok.encode(text, add_special_tokens=False)
        return [text[a:b] for (a, b), i in zip(encoding.offsets, encoding.ids) if i == self.unk_id]

    def decode(self, ids, skip_special_tokens):
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, text):
        return self.tok.token_to_id(text)


class _SentencePieceBackend:
    def __init__(self, path: Path):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: cannot be read as a SentencePiece model ({e})") from None
        self.vocab_size = self.sp.GetPieceSize()
        self.unk_id = self.sp.unk_id() if self.sp.unk_id() >= 0 else None

    def encode(self, text):
        return self.sp.EncodeAsIds(text)

    def id_to_token(self, i):
        return self.sp.IdToPiece(i)

    def unknown_text(self, text) -> list[str]:
        """The spans of `text` encoded as the unknown token (an unknown piece keeps its surface text)."""
        pieces = self.sp.EncodeAsPieces(text)
        return [piece.replace("\u2581", " ") for piece, i in zip(pieces, self.sp.EncodeAsIds(text))
                if i == self.unk_id]

    def decode(self, ids, skip_special_tokens):
        if skip_special_tokens:
            ids = [i for i in ids if not self.sp.IsControl(i)]
        return self.sp.DecodeIds(ids)

    def token_to_id(self, text):
        i = self.sp.PieceToId(text)
        return None if i == self.sp.unk_id() and text != self.sp.IdToPiece(i) else i


class IncrementalDecoder:
    """Turns a growing list of ids into text deltas without re-decoding the whole text each time.

    Decodes only a short window (ids since the last emitted boundary) and holds back text ending in an
    incomplete multi-byte character (decoded as U+FFFD) until later ids complete it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: ids before it are emitted and context-free
        self.read_offset = 0    # ids before it have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        return self._delta(final=False)

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the very end comes out as U+FFFD)."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        text = decode(self.ids[self.prefix_offset:], self.skip)
        if len(text) <= len(prefix) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix):]
