"""Chat and prompt/completion records: rendered to tokens with a per-token loss mask.

A JSONL line is one of
- `{"text": "..."}`: plain text, every token trained (as before);
- `{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...]}`: a
  conversation, rendered by the tokenizer's chat template;
- `{"prompt": "...", "completion": "..."}`: the prompt's tokens then the completion's.

`data.train_on` says which tokens are training targets: `assistant` (the default: the
assistant turns of a conversation, the completion of a prompt/completion record) or `all`.

Rendering a conversation:
- a Hugging Face tokenizer uses its own `chat_template`. Turn k's tokens are what rendering
  messages[:k+1] adds to rendering messages[:k]; for an assistant turn, what it adds to
  messages[:k] with the generation prompt (so the "assistant" header is context, not a target).
  A template that does not render a conversation as a growing prefix is refused, naming the
  record. (Each turn renders its whole prefix again: quadratic in the number of turns.)
- the byte tokenizer has a built-in template, `BYTE_CHAT_TEMPLATE`: each message is
  `<|role|>\\n` + content + `\\n`, and an assistant message ends with EOS instead of the
  newline (trained: the model learns to end its turn). The record ends with EOS in any case.

A bad record (not an object, no known fields, a message without a role or with an unknown
one, empty or non-string content, no assistant turn or empty completion where only those
train) is a DataError naming the file and line; prepare then writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from longtrain.config.schema import TRAIN_ON
from longtrain.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
# The byte tokenizer's template, per message (an assistant's content ends with EOS instead).
BYTE_CHAT_TEMPLATE = "<|{role}|>\n{content}\n"


@dataclass(frozen=True)
class Record:
    """One parsed JSONL line: `kind` is text | messages | prompt_completion."""

    kind: str
    text: str = ""
    messages: tuple[dict[str, str], ...] = ()
    prompt: str = ""
    completion: str = ""


def parse_record(obj: Any, where: str, text_field: str = "text") -> Record | None:
    """The record of one JSON value from `where` ("'file' line N"); None for an empty text
    (skipped, as empty documents are). Raises DataError naming `where` for a bad record."""
    if not isinstance(obj, dict):
        raise DataError(f"{where} is a JSON {type(obj).__name__}, expected an object")
    if text_field in obj:
        text = obj[text_field]
        if not isinstance(text, str):
            raise DataError(
                f"{where}: field {text_field!r} is {type(text).__name__}, expected a string"
            )
        return Record("text", text=text) if text else None
    if "messages" in obj:
        return Record("messages", messages=_messages(obj["messages"], where))
    if "prompt" in obj or "completion" in obj:
        parts = {}
        for key in ("prompt", "completion"):
            value = obj.get(key)
            if not isinstance(value, str) or not value:
                got = "missing" if key not in obj else f"{type(value).__name__} {value!r}"[:60]
                raise DataError(f"{where}: {key!r} must be a non-empty string, got {got}")
            parts[key] = value
        return Record("prompt_completion", **parts)
    raise DataError(
        f"{where} has none of the fields {text_field!r}, 'messages', or 'prompt' and "
        "'completion'; see docs/data.md for the record formats"
    )


def _messages(value: Any, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: 'messages' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        at = f"{where}: message {i}"
        if not isinstance(m, dict):
            raise DataError(f"{at} is a JSON {type(m).__name__}, expected an object")
        if "role" not in m:
            raise DataError(f"{at} has no 'role' (one of {', '.join(ROLES)})")
        if m["role"] not in ROLES:
            raise DataError(f"{at} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        content = m.get("content")
        if not isinstance(content, str) or not content:
            got = "missing" if "content" not in m else repr(content)[:60]
            raise DataError(f"{at} ({m['role']}) needs non-empty string 'content', got {got}")
        out.append({"role": m["role"], "content": content})
    return tuple(out)


def encode_record(record: Record, tok, train_on: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [T], mask uint8 [T]) of a messages or prompt/completion record, ending
    with EOS; mask 1 where a token is a training target under `train_on`. Raises DataError
    naming `where` when nothing would be trained or the chat template misbehaves."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on {train_on!r}; expected one of {TRAIN_ON}")
    if record.kind == "prompt_completion":
        pieces = [(tok.encode(record.prompt), False), (tok.encode(record.completion), True)]
        pieces.append((np.array([tok.eos_id], dtype=np.int64), True))
    elif hasattr(tok, "apply_chat_template"):
        pieces = _template_pieces(record.messages, tok, where)
    else:
        pieces = _byte_template_pieces(record.messages, tok)
    ids = np.concatenate([p for p, _ in pieces]).astype(np.int64)
    mask = np.concatenate([np.full(len(p), t, dtype=np.uint8) for p, t in pieces])
    if train_on == "all":
        mask[:] = 1
    if not mask.any():
        what = "assistant turn" if record.kind == "messages" else "completion token"
        raise DataError(
            f"{where}: no {what} to train on (data.train_on={train_on}); give the record "
            "one, or train on everything with data.train_on=all"
        )
    return ids, mask


def _byte_template_pieces(messages, tok) -> list[tuple[np.ndarray, bool]]:
    eos = np.array([tok.eos_id], dtype=np.int64)
    pieces = []
    for m in messages:
        assistant = m["role"] == "assistant"
        header = BYTE_CHAT_TEMPLATE.split("{content}")[0].format(role=m["role"])
        pieces.append((tok.encode(header), False))
        pieces.append((tok.encode(m["content"] + ("" if assistant else "\n")), assistant))
        if assistant:
            pieces.append((eos, True))
    if messages[-1]["role"] != "assistant":
        pieces.append((eos, False))
    return pieces


def _template_pieces(messages, tok, where: str) -> list[tuple[np.ndarray, bool]]:
    """Per turn, the tokens that rendering one more message adds (see the module doc)."""
    pieces, done = [], []
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            # The header the generation prompt adds is context (a first assistant turn has
            # nothing before it to render).
            context = tok.apply_chat_template(messages[:k], add_generation_prompt=True) if k else []
            _check_prefix(done, context, where, k)
            pieces.append((np.asarray(context[len(done) :], dtype=np.int64), False))
            done = context
        rendered = tok.apply_chat_template(messages[: k + 1], add_generation_prompt=False)
        _check_prefix(done, rendered, where, k)
        pieces.append((np.asarray(rendered[len(done) :], dtype=np.int64), m["role"] == "assistant"))
        done = rendered
    if not done or done[-1] != tok.eos_id:
        pieces.append((np.array([tok.eos_id], dtype=np.int64), messages[-1]["role"] == "assistant"))
    return pieces


def _check_prefix(before: list[int], after: list[int], where: str, k: int) -> None:
    if after[: len(before)] != before:
        raise DataError(
            f"{where}: the tokenizer's chat template renders message {k} by changing the "
            "tokens before it, so its turns cannot be told apart for the loss mask; use a "
            "template that renders a conversation as a growing prefix"
        )


__all__ = ["BYTE_CHAT_TEMPLATE", "ROLES", "TRAIN_ON", "Record", "encode_record", "parse_record"]
