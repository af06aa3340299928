"""Tokenizer: any HF `tokenizer.json`, its special tokens, and the model's padded vocabulary.

The model's embedding table is padded past the tokenizer's ids to a multiple of 128 so the LM-head
matmul tiles well on GPUs; the extra rows are never produced by the tokenizer and are masked out
when sampling. For GPT-NeoX-20B's 50,277 ids MPT uses 50,432 (= 394 * 128, inherited from
GPT-NeoX's own padding to 256 for 2-way tensor parallelism): the presets keep it so published MPT
checkpoints load; `padded_vocab_size` gives the smallest multiple of 128 (50,304) for new models.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from longboi.errors import UserError

ROLES = ("system", "user", "assistant")
# Names that mean "end of document" / "padding" across common tokenizers, in order of preference.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")
PAD_CANDIDATES = ("<|padding|>", "<pad>", "[PAD]", "<|pad|>")


def _byte_to_character() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: printable bytes stand for themselves, the rest map past 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


_BYTE_OF = {c: b for b, c in _byte_to_character().items()}


def padded_vocab_size(n: int, multiple: int = 128) -> int:
    return (n + multiple - 1) // multiple * multiple


class Tokenizer:
    """Wraps `tokenizers.Tokenizer` with EOS/pad ids and the checks a model needs."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / "tokenizer.json"
        if not self.path.is_file():
            raise UserError(f"tokenizer file not found: {self.path}")
        try:
            self._tok = HFTokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise UserError(f"{self.path}: not a valid HF tokenizer.json ({e})") from e
        special = self._special_tokens_from_config()
        self.chat_template: str | None = special.pop("chat_template", None)
        self.eos_id = self._find(special.get("eos_token"), EOS_CANDIDATES)
        pad = self._find(special.get("pad_token"), PAD_CANDIDATES)
        self.pad_id = pad if pad is not None else self.eos_id

    def _special_tokens_from_config(self) -> dict[str, str]:
        """eos/pad names from a tokenizer_config.json beside tokenizer.json, when there is one."""
        cfg_path = self.path.with_name("tokenizer_config.json")
        if not cfg_path.is_file():
            return {}
        cfg = json.loads(cfg_path.read_text())
        out = {}
        for key in ("eos_token", "pad_token"):
            value = cfg.get(key)
            out[key] = value.get("content") if isinstance(value, dict) else value
        if isinstance(cfg.get("chat_template"), str):  # a Jinja template, used by chat and finetuning
            out["chat_template"] = cfg["chat_template"]
        return {k: v for k, v in out.items() if v}

    def _find(self, preferred: str | None, candidates: Iterable[str]) -> int | None:
        for name in ([preferred] if preferred else []) + list(candidates):
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (including added tokens)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self):
        """The `tokenizers.Tokenizer` underneath, for libraries that read the vocabulary (llguidance)."""
        return self._tok

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self._tok.id_to_token(self.eos_id)

    def sha256(self) -> str:
        """Identity of the tokenizer file (prepared data records it so mismatches are caught)."""
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_each(self, ids: list[int]) -> list[str]:
        """Each id decoded alone (special tokens kept), in one call that releases the GIL."""
        return self._tok.decode_batch([[i] for i in ids], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for. A byte-level BPE token can hold part of a UTF-8 character
        (decoding it alone gives U+FFFD): its own bytes come from the byte-to-character map instead."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        byte_level, added = self._byte_layout
        if byte_level and token_id not in added and all(c in _BYTE_OF for c in piece):
            return bytes(_BYTE_OF[c] for c in piece)
        return self.decode([token_id], skip_special_tokens=False).encode()

    @cached_property
    def max_token_bytes(self) -> int:
        """The most bytes one token stands for: a text longer than n times this has more than n tokens."""
        pieces = (self._tok.id_to_token(i) or "" for i in range(self.vocab_size))
        return max(max(len(self.token_bytes(i)), len(p.encode())) for i, p in enumerate(pieces))

    @cached_property
    def _byte_layout(self) -> tuple[bool, frozenset[int]]:
        """(is the vocabulary byte-level, the ids of added tokens, which are plain text)."""
        spec = json.loads(self.path.read_text())
        decoders = [spec.get("decoder") or {}]
        decoders += decoders[0].get("decoders", []) if decoders[0].get("type") == "Sequence" else []
        byte_level = any(d.get("type") == "ByteLevel" for d in decoders)
        return byte_level, frozenset(a["id"] for a in spec.get("added_tokens", []))

    def check_fits(self, model_vocab_size: int) -> None:
        """Every id the tokenizer produces must index the model's embedding table."""
        if self.vocab_size > model_vocab_size:
            raise UserError(
                f"tokenizer {self.path} has {self.vocab_size} ids but the model's vocab_size is "
                f"{model_vocab_size}; use vocab_size >= {padded_vocab_size(self.vocab_size)}"
            )

    def save(self, directory: Path) -> None:
        """Write tokenizer.json plus a tokenizer_config.json naming eos/pad, so HF AutoTokenizer works too."""
        (directory / "tokenizer.json").write_bytes(self.path.read_bytes())
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        if self.eos_id is not None:
            config["eos_token"] = config["bos_token"] = config["unk_token"] = self._tok.id_to_token(self.eos_id)
        if self.pad_id is not None:
            config["pad_token"] = self._tok.id_to_token(self.pad_id)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def chatml(role: str, content: str) -> str:
    """One ChatML turn. At inference the prompt ends with chatml_open("assistant")."""
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


# render_chat's ChatML as a Jinja template, for clients that render prompts themselves (the server's
# /tokenizer_info gives it to lm-eval and others when the tokenizer has no template of its own).
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chatml_open(role: str) -> str:
    return f"<|im_start|>{role}\n"


def render_chat(messages: list[dict], template: str | None, add_generation_prompt: bool) -> str:
    """The conversation as text: the tokenizer's Jinja chat template if it has one, else ChatML.

    The same function renders at finetuning and in `longboi chat`, so a model sees its training
    format. A template ships inside a checkpoint, which may come from anyone: it is rendered in
    jinja2's immutable sandbox (as transformers does), where attribute tricks such as
    `''.__class__.__mro__` or reaching for `os` raise instead of running.
    """
    if template is None:
        text = "".join(chatml(m["role"], m["content"]) for m in messages)
        return text + (chatml_open("assistant") if add_generation_prompt else "")
    return _render_template(template, messages, add_generation_prompt)


def _render_template(template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    import jinja2  # declared in the core dependencies
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token="", eos_token=""
        )
    except jinja2.exceptions.SecurityError as e:
        raise UserError(f"the chat template tried an unsafe operation and was stopped: {e}") from e
    except jinja2.exceptions.TemplateError as e:
        raise UserError(f"the chat template failed to render: {e}") from e


def train_bpe(files: list[str | Path], vocab_size: int, out: str | Path, holdout_fraction: float = 0.0) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style, with <|endoftext|> and <|padding|>) on text files.

    A small vocabulary suits a small model: the LM head (d_model x vocab) is most of a tiny model's
    compute with a 50k vocabulary.
    """
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 260:
        raise UserError(f"vocab_size {vocab_size} is too small for byte-level BPE (256 bytes + specials)")
    for f in files:
        if not Path(f).is_file():
            raise UserError(f"tokenizer training file not found: {f}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [Path(f).read_text() for f in files]
    # Leave out each file's tail, the part `prepare --val-fraction` holds out, so the tokenizer has
    # not seen the validation text.
    texts = [t[: len(t) - int(len(t) * holdout_fraction)] for t in texts]
    tok.train_from_iterator(texts, trainer)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return Tokenizer(out)


class StreamDecoder:
    """Turns ids, pushed one at a time, into text pieces; never splits a multi-byte character.

    Incremental: each push decodes only a short window, the ids since the last emitted piece plus
    the piece before it for context (a tokenizer's decoder may treat a window's first token
    specially, e.g. SentencePiece's leading space), so a long reply costs O(length), not
    O(length^2). BPE tokens can end mid-UTF-8 sequence (byte-level BPE, byte-fallback tokens): a
    window that decodes to a trailing replacement character is held until the character completes.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: the ids of the last emitted piece, kept as context
        self.read = 0  # ids before this were emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        context, text = self._window()
        if len(text) <= len(context) or text.endswith("\ufffd"):  # nothing new yet, or a character half-done
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(context) :]

    def flush(self) -> str:
        """What is held back at the end (a character that never completed decodes as U+FFFD)."""
        context, text = self._window()
        self.prefix = self.read = len(self.ids)
        return text[len(context) :]

    def _window(self) -> tuple[str, str]:
        """The last emitted piece alone, and with everything after it: the new text is the difference."""
        return self.tok.decode(self.ids[self.prefix : self.read]), self.tok.decode(self.ids[self.prefix :])
