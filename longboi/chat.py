"""Multi-turn chat with a checkpoint: history, the ChatML template (as in finetuning), streaming."""

from __future__ import annotations

from collections.abc import Iterator

from longboi.data.finetune import chatml, chatml_open
from longboi.generate import SamplingParams, stream
from longboi.model import MPTForCausalLM
from longboi.tokenizer import Tokenizer


class ChatSession:
    """The conversation so far; `send` streams the assistant's reply and records it."""

    def __init__(self, model: MPTForCausalLM, tok: Tokenizer, params: SamplingParams, system: str | None = None):
        self.model, self.tok, self.system = model, tok, system
        # A reply ends at the end-of-turn marker the finetuning data taught the model.
        self.params = SamplingParams(**{**params.__dict__, "stop": tuple(params.stop) + ("<|im_end|>",)})
        self.messages: list[dict[str, str]] = []

    def prompt(self) -> str:
        turns = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        return "".join(chatml(m["role"], m["content"]) for m in turns) + chatml_open("assistant")

    def send(self, text: str) -> Iterator[str]:
        self.messages.append({"role": "user", "content": text})
        pieces = []
        for piece in stream(self.model, self.tok, self.prompt(), self.params):
            pieces.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})

    def reset(self) -> None:
        self.messages.clear()
