"""OpenAI request bodies as strict pydantic models: unknown fields, wrong types and out-of-range
values are 400s that name the field (no silent coercion of "5" to 5 or true to 1). Every number is
finite (JSON's NaN and Infinity literals are refused) and every list and string that the engine
works through per token or per step is bounded, so no request can make the others wait."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, StringConstraints
from pydantic_core import PydanticCustomError

from longboi.generate import SEED_RANGE

Penalty = Annotated[float, Field(ge=-2, le=2)]
MAX_TOKEN_ID = 2**31
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
TokenIds = list[TokenId]
Count = Annotated[int, Field(ge=0, le=2**31)]  # max_tokens and the like: past any context length
StopString = Annotated[str, Field(min_length=1, max_length=256)]
TokenKey = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,10}$")]  # ASCII decimal ids only ("²" is not one)
MAX_PROMPTS = 4096  # prompts in one request (n x prompts must also fit --max-batch)
MAX_PROMPT_CHARS = 10_000_000
PROMPT_SHAPES = "expected a string, a list of strings, a list of token ids, or a list of lists of token ids"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False


AdapterName = Annotated[str, Field(min_length=1, max_length=256)]


class AdapterRef(Strict):
    """One LoRA adapter a request applies, with its scale (longboi's extension; `model: "a+b"` is the short form)."""

    name: AdapterName
    scale: Annotated[float, Field(ge=-100, le=100)] = 1.0


class LoadLora(Strict):
    lora_name: AdapterName
    lora_path: Annotated[str, Field(min_length=1, max_length=4096)]


class UnloadLora(Strict):
    lora_name: AdapterName
    lora_int_id: int | None = None  # vLLM sends it; unused


class JsonSchemaSpec(Strict):
    name: Annotated[str, Field(max_length=256)] = "response"
    description: Annotated[str, Field(max_length=4096)] | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    """OpenAI's structured output: json_object (any JSON object) or json_schema (that schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class Sampling(Strict):
    """Fields shared by completions and chat completions."""

    model: Annotated[str, Field(max_length=4096)] | None = None
    adapters: Annotated[list[AdapterRef], Field(max_length=16)] | None = None
    temperature: Annotated[float, Field(ge=0, le=100)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=-1, le=2**31)] = -1  # vLLM's extension: -1 or 0 is no limit
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=16)] | None = None
    seed: Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: Annotated[float, Field(ge=0.01, le=100)] = 1.0  # 1e-300 is 0 in fp32: logits / 0
    logit_bias: Annotated[dict[TokenKey, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=300)] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    response_format: ResponseFormat | None = None
    # vLLM's per-request prefix-cache salt: blocks cached under one salt are never another salt's (or an
    # unsalted request's) hits, so a user cannot learn another's prompt prefixes from time to first token
    cache_salt: Annotated[str, Field(min_length=1, max_length=256)] | None = None


def _prompt(value: Any) -> Any:
    """A completion prompt: a text, texts, token ids or lists of token ids. Checked by hand in one pass:
    a union of list types makes pydantic try each branch, one error per element, and a million ids
    (3 MB of JSON) then take seconds on the event loop."""
    if isinstance(value, str):
        if len(value) > MAX_PROMPT_CHARS:
            raise PydanticCustomError("prompt", "a prompt of at most {n} characters", {"n": MAX_PROMPT_CHARS})
        return value
    if not isinstance(value, list):
        raise PydanticCustomError("prompt", PROMPT_SHAPES)
    if _token_ids(value):
        return value
    if len(value) > MAX_PROMPTS:
        raise PydanticCustomError("prompt", "at most {n} prompts in one request", {"n": MAX_PROMPTS})
    if all(isinstance(p, str) and len(p) <= MAX_PROMPT_CHARS for p in value):
        return value
    if all(isinstance(p, list) and p and _token_ids(p) for p in value):
        return value
    raise PydanticCustomError("prompt", PROMPT_SHAPES)


def _token_ids(value: list) -> bool:
    """A non-empty list of token ids (ints, not bools) in range; C-speed passes, not a Python loop."""
    return bool(value) and set(map(type, value)) == {int} and 0 <= min(value) and max(value) <= MAX_TOKEN_ID


class CompletionRequest(Sampling):
    prompt: Annotated[Any, PlainValidator(_prompt)]
    max_tokens: Count | None = 16
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1, le=128)] | None = None
    suffix: None = None  # insertion (fill-in-the-middle) is not supported: only null is accepted


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | Annotated[list[TextPart], Field(max_length=4096)]
    name: Annotated[str, Field(max_length=256)] | None = None


Messages = Annotated[list[Message], Field(min_length=1, max_length=4096)]


class ChatRequest(Sampling):
    messages: Messages
    max_tokens: Annotated[int, Field(ge=1, le=2**31)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=2**31)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: Annotated[str, Field(max_length=10_000_000)] | None = None
    messages: Messages | None = None
    add_special_tokens: bool = False
    add_generation_prompt: bool = True


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: TokenIds
