"""Structured output (response_format): even a random-weight model's answers parse and validate against
the schema whenever they end before max_tokens, on both endpoints, streamed or not, with n and seeds."""

from __future__ import annotations

import json
import time

import jsonschema
import openai
import pytest
from test_serve import KEY, serving

from longboi.errors import UserError
from longboi.serve.structured import Grammars
from longboi.tokenizer import Tokenizer

OBJ = {"type": "object", "additionalProperties": False}
SCHEMAS = [
    {"type": "object"},
    OBJ | {"properties": {"name": {"type": "string", "maxLength": 8}}, "required": ["name"]},
    OBJ | {"properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["age"]},
    OBJ | {"properties": {"x": {"type": "number", "minimum": -1.5, "maximum": 2.5}}, "required": ["x"]},
    OBJ | {"properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    OBJ | {"properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    OBJ | {"properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3}}},
    OBJ
    | {
        "properties": {"v": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}},
        "required": ["v"],
    },
    OBJ | {"properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["zip"]},
    OBJ | {"properties": {"id": {"type": "string", "pattern": "^[a-z]{2}-[0-9]{2}$"}}, "required": ["id"]},
    OBJ | {"properties": {"p": OBJ | {"properties": {"q": {"type": "integer"}}, "required": ["q"]}}, "required": ["p"]},
    OBJ
    | {
        "properties": {
            "a": OBJ
            | {"properties": {"b": OBJ | {"properties": {"c": {"enum": [1, 2]}}, "required": ["c"]}}, "required": ["b"]}
        },
        "required": ["a"],
    },
    OBJ | {"properties": {"n": {"type": ["integer", "null"]}}, "required": ["n"]},
    OBJ | {"properties": {"k": {"const": "fixed"}}, "required": ["k"]},
    OBJ
    | {"properties": {"u": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]}}, "required": ["u"]},
    OBJ
    | {
        "properties": {
            "s": {"type": "string", "minLength": 2, "maxLength": 5},
            "i": {"type": "integer", "exclusiveMinimum": 0, "maximum": 9},
        },
        "required": ["s", "i"],
    },
    OBJ
    | {
        "properties": {
            "items": {
                "type": "array",
                "maxItems": 2,
                "items": OBJ | {"properties": {"id": {"type": "integer"}}, "required": ["id"]},
            }
        },
        "required": ["items"],
    },
    {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 4},
    OBJ
    | {
        "properties": {"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}},
        "required": ["date"],
    },
    OBJ
    | {
        "properties": {
            "level": {"enum": ["low", "mid", "high"]},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["level", "score"],
    },
]


@pytest.fixture(scope="module")
def server(ckpt):
    yield from serving(ckpt, "--api-key", KEY, "--max-batch", "32", "--dtype", "fp32", "--max-model-len", "512")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def check(text: str, finish_reason: str, schema: dict) -> bool:
    """A finished answer parses and validates; one cut at max_tokens says so. True if it finished."""
    if finish_reason == "length":
        return False
    assert finish_reason == "stop", finish_reason
    jsonschema.validate(json.loads(text), schema)
    return True


def test_twenty_schemas_always_give_valid_json_when_finished(client):
    finished = 0
    for i, schema in enumerate(SCHEMAS):
        out = client.completions.create(
            model="tiny-alibi",
            prompt="JSON:",
            max_tokens=120,
            temperature=1.0,
            seed=i,
            n=2,
            extra_body={"response_format": schema_format(schema)},
        )
        for choice in out.choices:
            finished += check(choice.text, choice.finish_reason, schema)
    assert finished >= len(SCHEMAS)  # most finish: the grammar closes what it opened within 120 tokens


def test_chat_streaming_and_json_object(client):
    kwargs = dict(
        model="tiny-alibi",
        messages=[{"role": "user", "content": "an object"}],
        max_tokens=60,
        seed=7,
        response_format=schema_format(SCHEMAS[19]),
    )
    whole = client.chat.completions.create(**kwargs)
    assert check(whole.choices[0].message.content, whole.choices[0].finish_reason, SCHEMAS[19])
    chunks = client.chat.completions.create(**kwargs, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    kwargs["response_format"] = {"type": "json_object"}  # any object: a random model's keys may run past max_tokens
    for choice in client.chat.completions.create(**kwargs, n=4).choices:
        check(choice.message.content, choice.finish_reason, {"type": "object"})
        assert choice.message.content.startswith("{")


def test_a_schema_that_cannot_be_enforced_is_a_400_naming_it(client):
    for bad, words in [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}, "objekt"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}, "nowhere"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny-alibi", prompt="x", max_tokens=4, extra_body={"response_format": bad})
        assert words in str(e.value) and e.value.body["param"].startswith("response_format"), e.value.body


def test_the_demo_tokenizer_and_neox_both_compile(tokenizer_path, tmp_path):
    from longboi.tokenizer import train_bpe

    text = tmp_path / "t.txt"
    text.write_text('hello world, a small corpus for a byte-level BPE {"a": [1, 2]}\n' * 50)
    for tok in (Tokenizer(tokenizer_path), train_bpe([text], 300, tmp_path / "tok.json")):
        grammars = Grammars(tok, 50432)
        matcher = grammars.compile(schema_format(SCHEMAS[5])).new_matcher()
        assert not matcher.is_error()
    with pytest.raises(UserError, match="response_format.type"):
        Grammars(Tokenizer(tokenizer_path), 50432).compile({"type": "yaml"})


def slow_schema(seed: int) -> dict:
    """58 KB: two objects of 380 integer properties with odd ranges, ~0.3 s to compile with its matcher and first
    mask (AVX-512 EPYC). One object of 780 compiles but fails once `{` is consumed (see the test below)."""

    def ranges(offset: int, n: int) -> dict:
        properties = {f"p{i}": {"type": "integer", "minimum": -987654321 + 7919 * i + offset, "maximum": 10**11 + i}
                      for i in range(n)}  # fmt: skip
        return {"type": "object", "properties": properties}

    return {"type": "object", "properties": {"a": ranges(seed, 380), "b": ranges(seed + 1, 380)}}


def seconds_per_token(server, tokens: int) -> float:
    """An unconstrained greedy stream: seconds between its first and last token, per token."""
    import httpx

    body = {"prompt": "ROMEO:", "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    stamps = []
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                stamps.append(time.monotonic())
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def test_six_slow_schemas_at_once_leave_an_unconstrained_streams_time_per_token_unchanged(server, client):
    """Schemas compile in their own lane (two threads at a lower priority), with the matcher built there too:
    the engine thread copies it. Six 60 KB schemas sent together compile while a 300-token stream runs; the
    stream's time per token stays within 1.5x of its time alone (compiling them on the shared pool and building
    matchers on the engine thread stalled it for seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    seconds_per_token(server, 20)  # warm
    alone = seconds_per_token(server, 300)

    def constrained(k: int):
        fmt = {"type": "json_schema", "json_schema": {"name": f"slow{k}", "schema": slow_schema(k)}}
        return client.completions.create(
            model="tiny-alibi", prompt="{", max_tokens=2, extra_body={"response_format": fmt}
        )

    with ThreadPoolExecutor(6) as pool:
        answers = [pool.submit(constrained, k) for k in range(6)]
        time.sleep(0.05)
        during = seconds_per_token(server, 300)
        assert all(a.result().choices for a in answers)
    assert during < 1.5 * alone, (during, alone)


def test_a_schema_that_outlasts_the_grammar_timeout_is_a_400_naming_it(ckpt, client):
    for s in serving(ckpt, "--api-key", KEY, "--dtype", "fp32", "--grammar-timeout", "0.1"):
        slow = openai.OpenAI(base_url=f"{s.url}/v1", api_key=KEY, max_retries=0)
        deadline, obj = time.monotonic() + 30, {"response_format": {"type": "json_object"}}
        while True:  # the lane's warm-up at start (llguidance's first matcher, ~2 s) may still be running
            try:
                slow.completions.create(model="tiny-alibi", prompt="{", max_tokens=1, extra_body=obj)
                break
            except openai.BadRequestError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        fmt = {"type": "json_schema", "json_schema": {"name": "ranges", "schema": slow_schema(0)}}
        with pytest.raises(openai.BadRequestError) as e:
            slow.completions.create(model="tiny-alibi", prompt="{", max_tokens=2, extra_body={"response_format": fmt})
        message = e.value.body["message"]
        assert message == "response_format: the schema 'ranges' did not compile within 0.1 s (--grammar-timeout)"
        fast = slow.completions.create(model="tiny-alibi", prompt="{", max_tokens=2, extra_body=obj)
        assert fast.choices[0].text


def test_a_schema_that_outgrows_the_parser_limits_mid_answer_fails_that_request_alone_in_a_short_error(client):
    """780 integer properties, the last required (so `{}` cannot end it): the first mask passes, but consuming
    `{"`, the only token it allows, makes a parser row of 2,338 items (limit 2,000). That request ends with
    llguidance's short error (its verbose form quoted the whole 60 KB grammar); the server goes on serving."""
    ranges = {f"p{i}": {"type": "integer", "minimum": -987654321 + 7919 * i, "maximum": 123456789012 + 104729 * i}
              for i in range(780)}  # fmt: skip
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "wide", "schema": {"type": "object", "properties": ranges, "required": ["p779"]}},
    }
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="tiny-alibi", prompt="{", max_tokens=4, extra_body={"response_format": fmt})
    message = e.value.body["message"]
    assert "max is 2000" in message and len(message) < 400 and "p778" not in message, message[:500]
    ok = client.completions.create(model="tiny-alibi", prompt="a", max_tokens=2)
    assert ok.choices[0].text
