"""What the simulated engines say over HTTP: the OpenAI-compatible API as vLLM and SGLang serve it
(`/v1/completions`, `/v1/chat/completions`, streamed as server-sent events), SGLang's `/generate`, and
the P/D fields the routers add.

Tokens: the simulated tokenizer counts one token per whitespace-separated word of the prompt (of every
message's content for chat); an answer is `max_tokens` words (the engines generate to the length
limit, `finish_reason` "length"). Streams follow the engines' chunk formats: one chunk per token (chat
first sends the assistant role), the usage in a last chunk without choices when the request asks for it
(`stream_options.include_usage`), then `data: [DONE]`.

Every decode answer carries three headers of the lab's own, which both routers pass back to the client
with the decode's response: which prefill pod's KV cache it used (`x-disagg-prefill-pod`, empty when
none), which decode pod answered (`x-disagg-decode-pod`) and how its KV cache came (`x-disagg-kv`:
`transferred` or `recomputed`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

PREFILL_POD_HEADER = "x-disagg-prefill-pod"
DECODE_POD_HEADER = "x-disagg-decode-pod"
KV_HEADER = "x-disagg-kv"
MAX_TOKENS = 1 << 17
DEFAULT_MAX_TOKENS = 16
WORDS = ("the", "model", "answers", "with", "a", "simulated", "reply", "from", "a", "disaggregated", "engine",
         "running", "on", "a", "local", "cluster")

Api = Literal["completions", "chat", "generate"]


def count_tokens(text: str) -> int:
    """The simulated tokenizer: one token per whitespace-separated word (at least one)."""
    return max(1, len(text.split()))


def token_text(index: int) -> str:
    """The text of answer token `index` (1-based): a word and a space."""
    return WORDS[(index - 1) % len(WORDS)] + " "


def answer_text(tokens: int) -> str:
    return "".join(token_text(i) for i in range(1, tokens + 1))


@dataclass(frozen=True)
class Generation:
    """One generation request as an engine reads it."""

    api: Api
    model: str | None
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool
    kv_transfer_params: dict[str, Any] | None
    bootstrap: tuple[str, int, int] | None
    """SGLang P/D: (bootstrap_host, bootstrap_port, bootstrap_room)."""


def _positive_int(value: Any, default: int, name: str) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 1:
        raise ValueError(f"'{name}' must be a positive integer, got {value!r}")
    return min(int(value), MAX_TOKENS)


def _prompt_text(body: Mapping[str, Any], api: Api) -> str:
    if api == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        parts = []
        for message in messages:
            if not isinstance(message, dict):
                raise ValueError("each message must be an object")
            content = message.get("content", "")
            if isinstance(content, list):  # content parts
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            parts.append(str(content))
        return "\n".join(parts)
    key = "text" if api == "generate" else "prompt"
    prompt = body.get(key)
    if prompt is None and api == "generate" and isinstance(body.get("input_ids"), list):
        return " ".join(str(i) for i in body["input_ids"])
    if isinstance(prompt, list):
        return " ".join(str(p) for p in prompt)
    if not isinstance(prompt, str):
        raise ValueError(f"'{key}' must be a string")
    return prompt


def parse_generation(body: Any, api: Api) -> Generation:
    """The request's fields; ValueError with a message naming the field for a bad one."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    text = _prompt_text(body, api)
    if api == "generate":
        sampling = body.get("sampling_params") or {}
        if not isinstance(sampling, dict):
            raise ValueError("'sampling_params' must be an object")
        max_tokens = _positive_int(sampling.get("max_new_tokens"), 128, "sampling_params.max_new_tokens")
    else:
        max_tokens = _positive_int(body.get("max_completion_tokens", body.get("max_tokens")), DEFAULT_MAX_TOKENS,
                                   "max_tokens")
    options = body.get("stream_options")
    params = body.get("kv_transfer_params")
    bootstrap = None
    room = body.get("bootstrap_room")
    if room is not None:
        host, port = body.get("bootstrap_host"), body.get("bootstrap_port")
        if not isinstance(host, str) or isinstance(port, bool) or not isinstance(port, int) or not isinstance(
                room, int):
            raise ValueError("'bootstrap_host', 'bootstrap_port' and 'bootstrap_room' must be a host, a port and "
                             "an integer")
        bootstrap = (host, port, room)
    model = body.get("model")
    return Generation(
        api=api,
        model=str(model) if model is not None else None,
        prompt_tokens=count_tokens(text),
        max_tokens=max_tokens,
        stream=bool(body.get("stream")),
        include_usage=isinstance(options, dict) and bool(options.get("include_usage")),
        kv_transfer_params=params if isinstance(params, dict) else None,
        bootstrap=bootstrap,
    )


def error_body(kind: str, status: int, message: str) -> dict[str, Any]:
    """An error as the engine answers it (vLLM: under `error`; SGLang: at the top level)."""
    names = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError",
             503: "ServiceUnavailableError"}
    error = {"message": message, "type": names.get(status, "Error"), "param": None, "code": status}
    return {"error": error} if kind == "vllm" else {"object": "error", **error}


class Reply:
    """The answer to one generation request, whole or as server-sent events."""

    def __init__(self, generation: Generation, ident: str, model: str) -> None:
        self.g = generation
        self.ident = ident
        self.model = model
        self.created = int(time.time())

    def usage(self, tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.g.prompt_tokens, "completion_tokens": tokens,
                "total_tokens": self.g.prompt_tokens + tokens}

    def whole(self, tokens: int, kv_transfer_params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The non-streamed answer of `tokens` tokens."""
        text = answer_text(tokens)
        if self.g.api == "generate":
            return {"text": text, "meta_info": self._meta(tokens, finished=True)}
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length", "stop_reason": None}
        if self.g.api == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        out: dict[str, Any] = {"id": self.ident, "object": "chat.completion" if self.g.api == "chat"
                               else "text_completion", "created": self.created, "model": self.model,
                               "choices": [choice], "usage": self.usage(tokens)}
        if kv_transfer_params is not None:
            out["kv_transfer_params"] = kv_transfer_params
        return out

    def _meta(self, tokens: int, finished: bool) -> dict[str, Any]:
        return {"id": self.ident, "finish_reason": {"type": "length", "length": tokens} if finished else None,
                "prompt_tokens": self.g.prompt_tokens, "completion_tokens": tokens, "cached_tokens": 0}

    @staticmethod
    def event(payload: Mapping[str, Any] | str) -> bytes:
        data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
        return f"data: {data}\n\n".encode()

    def opening(self) -> bytes:
        """What a stream sends before its first token (chat: the assistant's role)."""
        if self.g.api != "chat":
            return b""
        return self.event(self._chunk({"role": "assistant", "content": ""}, None))

    def _chunk(self, delta_or_text: Any, finish: str | None) -> dict[str, Any]:
        if self.g.api == "chat":
            choice = {"index": 0, "delta": delta_or_text, "logprobs": None, "finish_reason": finish}
            return {"id": self.ident, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model, "choices": [choice]}
        choice = {"index": 0, "text": delta_or_text, "logprobs": None, "finish_reason": finish, "stop_reason": None}
        return {"id": self.ident, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [choice]}

    def token(self, index: int) -> bytes:
        """The chunk of answer token `index`; the last one says why the answer ends."""
        last = index >= self.g.max_tokens
        if self.g.api == "generate":
            return self.event({"text": answer_text(index), "meta_info": self._meta(index, finished=last),
                               "index": 0})
        text = token_text(index)
        delta: Any = {"content": text} if self.g.api == "chat" else text
        return self.event(self._chunk(delta, "length" if last else None))

    def closing(self, tokens: int) -> bytes:
        """After the last token: the usage chunk when asked for, then [DONE]."""
        out = b""
        if self.g.include_usage and self.g.api != "generate":
            usage: dict[str, Any] = {"id": self.ident, "object": "chat.completion.chunk" if self.g.api == "chat"
                     else "text_completion", "created": self.created, "model": self.model, "choices": [],
                     "usage": self.usage(tokens)}
            out += self.event(usage)
        return out + self.event("[DONE]")


def tokenizer_json() -> dict[str, Any]:
    """A Hugging Face tokenizer.json of the simulated tokenizer (words split on whitespace), which the
    routers load from the engines' model directory."""
    vocab = {"[UNK]": 0}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": 0, "content": "[UNK]", "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    }
