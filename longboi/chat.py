"""Multi-turn chat with a checkpoint: history, the chat template (as in finetuning), streaming."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from longboi.generate import SamplingParams, stream
from longboi.model import MPTForCausalLM
from longboi.tokenizer import Tokenizer, render_chat

if TYPE_CHECKING:
    from longboi.compiled import CompiledDecoder


class ChatSession:
    """The conversation so far; `send` streams the assistant's reply and records it."""

    def __init__(
        self,
        model: MPTForCausalLM,
        tok: Tokenizer,
        params: SamplingParams,
        system: str | None = None,
        decoder: CompiledDecoder | None = None,
    ):
        self.model, self.tok, self.system, self.decoder = model, tok, system, decoder
        # With ChatML a reply ends at the end-of-turn marker the finetuning data taught the model;
        # other templates end replies with EOS (appended to every training example).
        end = () if tok.chat_template else ("<|im_end|>",)
        self.params = SamplingParams(**{**params.__dict__, "stop": tuple(params.stop) + end})
        self.messages: list[dict[str, str]] = []

    def prompt(self) -> str:
        turns = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        return render_chat(turns, self.tok.chat_template, add_generation_prompt=True)

    def send(self, text: str) -> Iterator[str]:
        self.messages.append({"role": "user", "content": text})
        pieces = []
        for piece in stream(self.model, self.tok, self.prompt(), self.params, self.decoder):
            pieces.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})

    def reset(self) -> None:
        self.messages.clear()
