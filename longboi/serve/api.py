"""The HTTP layer: OpenAI's completions and chat routes, tokenizer routes, metrics and the chat page,
over one Engine. Needs the `serve` extra (FastAPI, uvicorn).

Everything a client sends is checked before it reaches the engine: the schemas reject unknown
fields, wrong types and out-of-range values; lengths, token ids and the model name are checked
here. Every error is OpenAI's shape, {"error": {"message", "type", "param", "code"}}, and nothing a
client sends reaches the engine thread unchecked, so no request can disturb the others.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from longboi.errors import UserError
from longboi.generate import SamplingParams
from longboi.quantize import precision_of
from longboi.serve.engine import Engine, Event, Job, QueueFull, TokenInfo
from longboi.serve.metrics import Metrics
from longboi.tokenizer import CHATML_TEMPLATE, Tokenizer, render_chat

if TYPE_CHECKING:  # the serve extra is imported where it is used, so this module imports without it
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    from longboi.multilora import AdapterBank, Stack
    from longboi.serve.schemas import ChatRequest, CompletionRequest, Message, Sampling
    from longboi.serve.structured import Grammar

OPEN_PATHS = ("/health", "/")  # no key needed: liveness, and the chat page (it holds no data; its calls send the key)
PAGE = Path(__file__).with_name("static") / "index.html"
MAX_STACK = 8  # adapters one request may stack


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


@dataclass
class Settings:
    model_name: str
    api_key: str | None = None
    max_batch: int = 64
    max_queue: int = 256
    max_model_len: int | None = None  # None: the model's max_seq_len
    max_body_bytes: int = 8 * 2**20
    prefill_chunk: int = 256
    prefix_cache: bool = True
    kv_cache_bytes: int | Literal["auto"] | None = None  # None: no limit but max_batch x max_model_len
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES  # Host header names answered ("*": any)
    loras: dict[str, str] = field(default_factory=dict)  # LoRA adapters loaded at start: name -> directory
    enable_lora: bool = False  # adapters may be loaded at run time even when none is given at start
    lora_root: str | None = None  # the resolved directory run-time loads must lie in (required by enable_lora)
    max_loras: int = 8  # adapters held at once
    max_lora_rank: int = 64
    grammar_timeout: float = 10.0  # seconds a response_format may take to compile (queueing included)


@dataclass
class Served:
    """What the routes share: the engine (and its tokenizer) once loaded, the limits."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    engine: Engine | None = None
    load_error: str | None = None
    bank: AdapterBank | None = None  # the LoRA adapters requests may name (None: LoRA is off)

    def ready(self) -> tuple[Engine, Tokenizer]:
        if self.engine is None:
            raise APIError(503, self.load_error or "the model is still loading", "service_unavailable")
        return self.engine, self.engine.tok


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
    from fastapi.responses import JSONResponse

    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# -- app ---------------------------------------------------------------------------------------


def create_app(settings: Settings, load: Callable[[], tuple]) -> FastAPI:
    """The app. `load()` returns (model, tokenizer); it runs in a thread at start-up, so /health
    answers 503 while the weights load."""
    from fastapi import FastAPI

    served = Served(settings)
    app = FastAPI(title="longboi", lifespan=_lifespan(served, load), docs_url=None, redoc_url=None)
    app.state.served = served
    _handlers(app, served)
    _routes(app, served)
    app.add_middleware(Guard, served=served)
    return app


def _lifespan(served: Served, load: Callable[[], tuple]):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        thread = threading.Thread(target=_load_engine, args=(served, load), name="longboi-load", daemon=True)
        thread.start()
        yield
        if served.engine is not None:
            served.engine.stop()

    return lifespan


def _load_engine(served: Served, load: Callable[[], tuple]) -> None:
    s = served.settings
    try:
        model, tok = load()
        served.bank = _adapter_bank(model, s)
        kv = available_memory(model) // 3 if s.kv_cache_bytes == "auto" else s.kv_cache_bytes  # after the load
        engine = Engine(
            model, tok, s.max_batch, s.max_queue, s.max_model_len, s.prefill_chunk, served.metrics, kv, s.prefix_cache
        )
        engine.bank = served.bank
    except Exception as e:  # the server stays up to say why (health 503 with the reason)
        served.load_error = f"the model failed to load: {e}"
        print(f"error: {served.load_error}", flush=True)
        return
    served.metrics.gauge("requests_running", "Sequences being prefilled or decoded.", lambda: engine.load[0])
    served.metrics.gauge("requests_waiting", "Requests queued for a batch slot.", lambda: engine.load[1])
    served.metrics.gauge(
        "kv_cache_bytes", "Bytes of KV-cache blocks in use or kept for prefix hits.", lambda: engine.kv_held_bytes
    )
    _ = tok.max_token_bytes  # computed once now (a pass over the vocabulary), not on the first request
    engine.grammars.lane.submit(engine.grammars.warm)  # in the background: the first compile costs ~2 s more
    served.engine = engine.start()
    precision = precision_of(model)
    kv = "no limit" if engine.kv_cache_bytes is None else f"{engine.kv_cache_bytes / 2**30:.2f} GiB"
    print(
        f"ready: {s.model_name} (precision {precision}, max_model_len {engine.max_model_len}, KV cache {kv})",
        flush=True,
    )


def _adapter_bank(model, s: Settings) -> AdapterBank | None:
    """The adapters given at start, loaded onto the base (None when LoRA serving is off)."""
    if not (s.loras or s.enable_lora):
        return None
    from longboi.multilora import AdapterBank

    bank = AdapterBank(model, s.max_loras, s.max_lora_rank)
    for name, path in s.loras.items():
        bank.load(name, path)
    return bank


def parse_kv_cache_memory(text: str) -> int | Literal["auto"] | None:
    """`4GiB`, `512MiB`, `1e9` (bytes), `auto` or `none`. auto is a third of the memory available once the
    model is loaded: while the cache grows, its old and new buffers exist together for a moment."""
    value = text.strip().lower()
    if value in ("none", "auto"):
        return None if value == "none" else "auto"
    m = re.fullmatch(r"([0-9.]+(?:e[0-9]+)?)\s*(b|kib|mib|gib|tib|kb|mb|gb|tb)?", value)
    units = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12}
    units |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    try:
        size = int(float(m.group(1)) * units[m.group(2) or "b"]) if m else 0
    except ValueError:
        size = 0
    if size <= 0:
        raise UserError(f"--kv-cache-memory {text!r}: expected a size such as 4GiB or 512MiB, auto, or none")
    return size


def available_memory(model=None) -> int:
    """Bytes available to new allocations where `model` runs: free GPU memory for a CUDA model, else the
    host's MemAvailable (or all of it where unknown)."""
    import torch

    device = next(model.parameters()).device if model is not None else torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class Guard:
    """Before anything parses a body: the Host header (a web page cannot reach a loopback server through
    DNS rebinding), the API key (a keyless request is a 401 even when its body is garbage), the content
    type (only application/json: a page can post text/plain or a form to any server without a CORS
    preflight) and the body size, counted as it arrives (a chunked body has no Content-Length to trust).
    Pure ASGI: streaming and disconnects pass through untouched."""

    def __init__(self, app, served: Served):
        self.app, self.served = app, served

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rejection = self._check(scope["path"], headers)
        if rejection is None and scope["method"] in ("POST", "PUT", "PATCH"):
            rejection = _content_type_rejection(headers.get("content-type"))
            if rejection is None:
                body, rejection = await self._read_body(receive)
                if body is None:  # the client left while sending its body: nobody to answer
                    return
                if rejection is None:  # megabytes take a fraction of a second: off the event loop
                    rejection = (
                        await asyncio.to_thread(_nesting_rejection, body)
                        if len(body) > 2**16
                        else _nesting_rejection(body)
                    )
                receive = _replay(body, receive)
        if rejection is None:
            return await self.app(scope, receive, send)
        self.served.metrics.count_labelled("requests_rejected", code=str(rejection.status_code))
        await rejection(scope, receive, send)

    def _check(self, path: str, headers: dict[str, str]) -> Response | None:
        host = host_name(headers.get("host", ""))
        allowed = self.served.settings.allowed_hosts
        if "*" not in allowed and host not in allowed:
            message = f"Host header {host!r} is not a name this server answers to (see --allowed-hosts)"
            return error_response(400, message, "invalid_request_error", "host")
        key = self.served.settings.api_key
        if key and path not in OPEN_PATHS and not _authorized(headers, key):
            message = "missing or invalid API key: send 'Authorization: Bearer KEY' (or 'X-Api-Key: KEY')"
            return error_response(401, message, "authentication_error", code="invalid_api_key")
        length = headers.get("content-length", "0")
        limit = self.served.settings.max_body_bytes
        if length.isascii() and length.isdigit() and int(length) > limit:
            return error_response(413, f"request body of {length} bytes is over {limit}", "invalid_request_error")
        return None

    async def _read_body(self, receive) -> tuple[bytes | None, Response | None]:
        """The whole body, or a 413 as soon as it passes the limit (nothing more is read); None if the
        client went away."""
        limit, parts, size = self.served.settings.max_body_bytes, [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", error_response(413, f"request body of over {limit} bytes", "invalid_request_error")
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts), None


def _content_type_rejection(content_type: str | None) -> Response | None:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == "application/json":
        return None
    message = f"request bodies are JSON: send 'Content-Type: application/json' (got {content_type or 'none'!r})"
    return error_response(415, message, "invalid_request_error", "content-type")


MAX_JSON_DEPTH = 128  # nesting a request body may have: OpenAI's bodies (and JSON schemas) need a few dozen
_JSON_STRINGS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # unrolled: one step per run, not per byte
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_BRACKET_STEP = torch.zeros(256, dtype=torch.int64)  # byte -> its change of depth
_BRACKET_STEP[list(b"[{")], _BRACKET_STEP[list(b"]}")] = 1, -1


def _nesting_rejection(body: bytes) -> Response | None:
    """A 400 for a body nested past MAX_JSON_DEPTH, found before any parser recurses into it: strings cut
    out (their brackets are text), the brackets left counted at C speed."""
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:  # every ordinary body: no nesting that deep
        return None
    brackets = _JSON_STRINGS.sub(b"", body).translate(None, _NOT_BRACKETS)
    if len(brackets) <= MAX_JSON_DEPTH:
        return None
    steps = torch.frombuffer(bytearray(brackets), dtype=torch.uint8).long()
    depth = int(_BRACKET_STEP[steps].cumsum(0).max())
    if depth <= MAX_JSON_DEPTH:
        return None
    message = f"the body nests {depth:,} levels deep; at most {MAX_JSON_DEPTH} are accepted"
    return error_response(400, message, "invalid_request_error")


def _replay(body: bytes, receive):
    """An ASGI receive that hands the app the body already read, then the client's later messages
    (a disconnect), so the routes and streaming responses work as if nothing had read it."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def host_name(host: str) -> str:
    """'Example.com:8000' -> 'example.com'; '[::1]:8000' -> '[::1]'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    name, _, port = host.rpartition(":")
    return name if name and port.isdigit() else host


def _authorized(headers: dict[str, str], key: str) -> bool:
    bearer = headers.get("authorization", "")
    given = bearer[7:] if bearer[:7].lower() == "bearer " else headers.get("x-api-key", "")
    return hmac.compare_digest(given.encode(), key.encode())


def _handlers(app: FastAPI, served: Served) -> None:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    def reject(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
        served.metrics.count_labelled("requests_rejected", code=str(status))
        return error_response(status, message, type_, param, code, headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return reject(e.status, e.message, e.type, e.param, e.code, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        message, param = _describe(e.errors())
        return reject(400, message, "invalid_request_error", param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return reject(e.status_code, str(e.detail), "invalid_request_error")

    @app.exception_handler(UserError)
    async def user_error(request: Request, e: UserError):
        return reject(400, str(e), "invalid_request_error")


def _describe(errors) -> tuple[str, str | None]:
    """pydantic's first error -> ("field: what is wrong", "field")."""
    # a union (prompt: str | list[str] | list[int] | ...) fails once per branch: the deepest error says most
    first = max(errors, key=lambda e: len(e["loc"])) if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}", None
    loc = [p for p in first["loc"] if p != "body"]
    # keep field names and list indexes; drop pydantic's union-branch tags ('constrained-str', 'list[int]')
    parts = [f"[{p}]" if isinstance(p, int) else p for p in loc if isinstance(p, int) or _is_field(p)]
    param = ".".join(parts).replace(".[", "[")
    if first.get("type") == "missing" and not loc:
        return "a JSON body is required", None
    if first.get("type") == "model_attributes_type" and not loc:
        return "the body must be a JSON object", None
    if first.get("type") == "extra_forbidden":
        return f"{param}: unknown field", param
    return f"{param or 'body'}: {first['msg']}", param or None


def _is_field(name: str) -> bool:
    return re.fullmatch(r"[a-z_][a-z0-9_]*", name) is not None and name not in ("str", "int", "float", "bool", "none")


def _typed(fn, **annotations):
    """Give a route handler its parameter types as objects: FastAPI reads them to parse the body, and
    the types come from the serve extra, imported in the function that defines the handler."""
    fn.__annotations__ = annotations
    return fn


def _routes(app: FastAPI, served: Served) -> None:
    from fastapi import Request
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

    from longboi.serve.schemas import ChatRequest, CompletionRequest

    @app.get("/health")
    async def health():
        if served.engine is None:
            status = "failed" if served.load_error else "loading"
            return JSONResponse({"status": status, "detail": served.load_error}, status_code=503)
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text())

    @app.get("/v1/models")
    async def models():
        engine, _ = served.ready()
        base = served.settings.model_name
        card = {"id": base, "object": "model", "created": 0, "owned_by": "longboi"}
        card["max_model_len"] = engine.max_model_len
        adapters = served.bank.listed() if served.bank is not None else []
        cards = [card | {"id": a.name, "parent": base, "lora_rank": a.rank} for a in adapters]
        return {"object": "list", "data": [card | {"parent": None}, *cards]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(served.metrics.render(), media_type="text/plain; version=0.0.4")

    async def completions(body, request):
        return await _completions(served, body, request)

    async def chat(body, request):
        return await _chat(served, body, request)

    app.post("/v1/completions")(_typed(completions, body=CompletionRequest, request=Request))
    app.post("/v1/chat/completions")(_typed(chat, body=ChatRequest, request=Request))

    _tokenizer_routes(app, served)
    _lora_routes(app, served)


def _lora_routes(app: FastAPI, served: Served) -> None:
    """vLLM's run-time adapter loading: POST {"lora_name", "lora_path"} / {"lora_name"}. Behind the API key
    like every route; a path is read on the server, so expose a server with LoRA on only with a key."""
    from fastapi.responses import PlainTextResponse

    from longboi.serve.schemas import LoadLora, UnloadLora

    def bank() -> AdapterBank:
        served.ready()
        if served.bank is None or not served.settings.enable_lora:
            raise APIError(400, "loading adapters at run time is off: start the server with --enable-lora")
        return served.bank

    async def load(body):
        _check_adapter_name(served, body.lora_name)
        loras = bank()
        path = _confined(served.settings.lora_root, body.lora_path)
        try:
            await asyncio.to_thread(loras.load, body.lora_name, path)
        except UserError as e:
            raise APIError(400, str(e), param="lora_path") from e
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    async def unload(body):
        try:
            bank().unload(body.lora_name)
        except UserError as e:
            raise APIError(404, str(e), param="lora_name", code="model_not_found") from e
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    app.post("/v1/load_lora_adapter")(_typed(load, body=LoadLora))
    app.post("/v1/unload_lora_adapter")(_typed(unload, body=UnloadLora))


def _confined(root: str | None, requested: str) -> Path:
    """A client's lora_path, relative to --lora-root, resolved with its symlinks; a 400 that says nothing of
    whether the path exists when it resolves outside the root (as vLLM's resolver confines its cache dir)."""
    if root is None:
        raise APIError(400, "run-time adapter loads need the server's --lora-root", param="lora_path")
    base = Path(root)
    try:
        path = (base / requested).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        path = None
    if path is None or not path.is_relative_to(base):
        message = f"lora_path: {requested!r} is not inside the server's --lora-root"
        raise APIError(400, message, param="lora_path")
    return path


def _tokenizer_routes(app: FastAPI, served: Served) -> None:
    from fastapi.responses import JSONResponse

    from longboi.serve.schemas import DetokenizeRequest, TokenizeRequest

    def tokenized(body, tok: Tokenizer, limit: int) -> tuple[list[int], list[str]]:
        text = body.prompt if body.prompt is not None else _chat_prompt(tok, body.messages, body.add_generation_prompt)
        ids = _encode(tok, text, "prompt" if body.prompt is not None else "messages", limit)
        return ids, tok.decode_each(ids)

    async def tokenize(body):
        engine, tok = served.ready()
        _check_model(served, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        ids, strs = await asyncio.to_thread(tokenized, body, tok, engine.max_model_len)  # off the event loop
        return JSONResponse(
            {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids, "token_strs": strs}
        )

    async def detokenize(body):
        _, tok = served.ready()
        _check_model(served, body.model)
        _check_ids(tok, body.tokens, "tokens")
        return {"prompt": await asyncio.to_thread(tok.decode, body.tokens, False)}

    app.post("/tokenize")(_typed(tokenize, body=TokenizeRequest))
    app.post("/detokenize")(_typed(detokenize, body=DetokenizeRequest))

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        engine, tok = served.ready()
        eos = tok.eos_token
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": eos,
            "bos_token": eos,
            "pad_token": None if tok.pad_id is None else tok.decode([tok.pad_id], skip_special_tokens=False),
            "chat_template": tok.chat_template or CHATML_TEMPLATE,
            "model_max_length": engine.max_model_len,
            "vocab_size": tok.vocab_size,
        }


# -- checks ------------------------------------------------------------------------------------


def _check_model(served: Served, name: str | None) -> None:
    """`name` is the base model, an adapter or a stack of them (they share the base's tokenizer)."""
    _stack_of(served, name)


async def _grammar(served: Served, engine: Engine, body: Sampling) -> Grammar | None:
    """The request's response_format as a checked grammar, or None. Compiled in the grammars' own lane (not the
    pool that tokenizes every request), within --grammar-timeout counted from the request (queueing included:
    a compile still waiting when time is up never starts)."""
    if body.response_format is None:
        return None
    spec = body.response_format.model_dump(by_alias=True)
    limit = served.settings.grammar_timeout
    lane = asyncio.get_running_loop().run_in_executor(engine.grammars.lane, engine.grammars.compile, spec)
    try:
        return await asyncio.wait_for(lane, limit)
    except UserError as e:
        raise APIError(400, str(e), param="response_format") from e
    except TimeoutError as e:
        named = body.response_format.json_schema.name if body.response_format.json_schema else "json_object"
        message = f"response_format: the schema {named!r} did not compile within {limit:g} s (--grammar-timeout)"
        raise APIError(400, message, param="response_format") from e


def _name(served: Served, body: Sampling) -> str:
    """The model a response names: what the request asked for (the base by default)."""
    return body.model or served.settings.model_name


def _check_adapter_name(served: Served, name: str) -> None:
    if name == served.settings.model_name or "+" in name:
        message = f"lora_name: {name!r} is the base model's name or holds '+' (which stacks adapters in `model`)"
        raise APIError(400, message, param="lora_name")


def _stack(served: Served, body: Sampling) -> Stack:
    """The adapters a request applies: its `model`, plus `adapters` ([{name, scale}]) with their scales."""
    return _stack_of(served, body.model, tuple((a.name, a.scale) for a in body.adapters or ()))


def _stack_of(served: Served, model: str | None, scaled: tuple[tuple[str, float], ...] = ()) -> Stack:
    """`model` names the base, an adapter, or a stack "a+b" (or "base+a+b"); the adapters it names and
    `scaled` ones, looked up in the server's bank (a 400 naming what is unknown)."""
    base, names = served.settings.model_name, (model or served.settings.model_name).split("+")
    if names[0] == base:
        names = names[1:]
    wanted = [(n, 1.0) for n in names] + list(scaled)
    if len(wanted) > MAX_STACK:  # each adapter of a stack costs every step of the batch two matmuls per linear
        raise APIError(400, f"model: a stack of {len(wanted)} adapters; at most {MAX_STACK}", param="model")
    if names and served.bank is None:
        message = f"model: unknown model {model!r}; this server serves {base!r}"
        raise APIError(400, message, param="model", code="model_not_found")
    if wanted and served.bank is None:
        raise APIError(400, "adapters: LoRA serving is off on this server", param="adapters")
    stack = []
    for name, scale in wanted:
        adapter = served.bank.get(name) if served.bank is not None else None
        if adapter is None:
            known = [base, *(a.name for a in served.bank.listed())] if served.bank is not None else [base]
            message = f"model: unknown model or adapter {name!r}; this server serves {known}"
            raise APIError(400, message, param="model", code="model_not_found")
        stack.append((adapter, scale))
    return tuple(stack)


def _check_ids(tok: Tokenizer, ids: list[int], param: str) -> None:
    if not ids or max(ids) < tok.vocab_size:
        return
    bad = next((i for i in ids if i >= tok.vocab_size), None)
    if bad is not None:
        raise APIError(400, f"{param}: token id {bad} is out of range (vocab size {tok.vocab_size})", param=param)


def _prompt_items(prompt) -> list[str | list[int]]:
    """The request's prompts, each a text or a list of token ids (not yet tokenized)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):  # the schema checked the rest
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise APIError(400, "prompt: no prompt given", param="prompt")
    return items


def _prompts(items: list, tok: Tokenizer, limit: int) -> list[tuple[list[int], str | None]]:
    """Prompts as (token ids, original text or None). Tokenizes: call it off the event loop."""
    out = []
    for item in items:
        ids = _encode(tok, item, "prompt", limit) if isinstance(item, str) else item
        if not ids:
            raise APIError(400, "prompt: a prompt must have at least one token", param="prompt")
        _check_ids(tok, ids, "prompt")
        out.append((ids, item if isinstance(item, str) else None))
    return out


def _encode(tok: Tokenizer, text: str, param: str, limit: int | None = None) -> list[int]:
    """Token ids of a client's text. Not Unicode (JSON allows lone surrogates): a 400. More bytes than
    `limit` tokens of the tokenizer's longest could hold: a 400 before spending seconds of CPU on it.
    Through encode_batch, which releases the GIL (encode holds it: an 8 MB prompt froze every other
    request for 12 s, event loop included)."""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise APIError(400, f"{param}: the text is not valid Unicode ({e.reason} at {e.start})", param=param) from e
    if limit is not None and size > limit * tok.max_token_bytes:
        message = f"{param}: {size:,} bytes of text are more than max_model_len {limit} tokens can hold"
        raise APIError(400, message, param=param)
    return tok.encode_batch([text])[0]


def _check_kv(engine: Engine, n: int, n_prompt: int, max_tokens: int) -> None:
    """A request whose choices, at their longest, would not fit the KV-cache limit even alone is a 400
    (one that fits waits for room instead)."""
    limit = engine.kv_cache_bytes
    need = engine.kv_bytes(n, n_prompt, max_tokens)
    if limit is not None and need > limit:
        message = (
            f"max_tokens: {n} choice(s) of a {n_prompt}-token prompt plus max_tokens {max_tokens} need "
            f"{need / 2**20:.1f} MiB of KV cache, over the server's --kv-cache-memory of {limit / 2**20:.1f} MiB; "
            "ask for fewer tokens or choices"
        )
        raise APIError(400, message, param="max_tokens")


def _check_fits(engine: Engine, n_prompt: int, max_tokens: int) -> None:
    limit = engine.max_model_len
    if n_prompt > limit:
        raise APIError(400, f"prompt: {n_prompt} tokens, over the server's max_model_len {limit}", param="prompt")
    if n_prompt + max_tokens > limit:
        message = (
            f"max_tokens: a prompt of {n_prompt} tokens plus max_tokens {max_tokens} is over the server's "
            f"max_model_len {limit}; ask for at most {limit - n_prompt}"
        )
        raise APIError(400, message, param="max_tokens")


def _sampling(body: Sampling, tok: Tokenizer, max_tokens: int, stop: tuple[str, ...] = ()) -> SamplingParams:
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    bias = []
    for key, value in (body.logit_bias or {}).items():  # keys are ASCII decimals (the schema's pattern)
        if int(key) >= tok.vocab_size:
            message = f"logit_bias: {key!r} is not a token id of this model (vocab size {tok.vocab_size})"
            raise APIError(400, message, param="logit_bias")
        bias.append((int(key), value))
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=body.temperature,
        top_k=None if body.top_k <= 0 else body.top_k,
        top_p=body.top_p,
        repetition_penalty=body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        stop=stops + stop,
        seed=body.seed,
        logit_bias=tuple(bias),
    )


def _check_n(served: Served, n: int, prompts: int) -> None:
    if n * prompts > served.settings.max_batch:
        message = f"n: {n} choices x {prompts} prompts is over the server's --max-batch {served.settings.max_batch}"
        raise APIError(400, message, param="n")


# -- running requests --------------------------------------------------------------------------


class Pending:
    """The engine jobs of one HTTP request; their events arrive on an asyncio queue."""

    def __init__(self, engine: Engine):
        self.engine, self.jobs = engine, []
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.prompt_tokens = self.completion_tokens = 0  # summed over the jobs as they finish

    def add(self, prompt: list[int], params: SamplingParams, **options) -> Job:
        index = len(self.jobs)

        def sink(event: Event) -> None:  # engine thread -> event loop
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

        job = Job(prompt, params, sink, **options)
        self.jobs.append(job)
        return job

    def submit(self) -> None:
        try:
            for job in self.jobs:
                self.engine.submit(job)
        except QueueFull as e:
            self.cancel()
            raise APIError(429, f"server busy: {e}; retry shortly", "rate_limit_error", code="queue_full") from e
        except ValueError as e:  # the request's checks should have caught it: still its own 400, siblings cancelled
            self.cancel()
            raise APIError(400, f"prompt: {e}", param="prompt") from e

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(job index, event) until every job is done (a job's final event adds to the usage and is not
        yielded); an engine error becomes a 500."""
        open_jobs = len(self.jobs)
        while open_jobs:
            index, event = await self.queue.get()
            if index < 0:  # cancelled: the engine sends a cancelled job nothing more, so stop waiting
                raise APIError(499, "the client closed the request", "invalid_request_error")
            if event.error:
                raise APIError(500, event.error, "server_error")
            if event.done:
                open_jobs -= 1
                self.prompt_tokens += event.usage[0]
                self.completion_tokens += event.usage[1]
                continue
            yield index, event

    def usage(self) -> dict:
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}

    def cancel(self) -> None:
        """Free the jobs' rows, and end `events` (a handler whose client hung up must not wait forever)."""
        for job in self.jobs:
            self.engine.cancel(job)
        self.queue.put_nowait((-1, Event(done=True)))


@dataclass
class ChoiceOut:
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None


async def _collect(pending: Pending, request: Request, n: int) -> tuple[dict[int, ChoiceOut], dict, list]:
    """Run to the end: choices by global index, usage, and each job's prompt token infos."""
    choices: dict[int, ChoiceOut] = {}
    prompts: list = [None] * len(pending.jobs)
    watcher = asyncio.ensure_future(_disconnected(request, pending))
    try:
        async for index, ev in pending.events():
            if ev.prompt is not None:
                prompts[index] = ev.prompt
            else:
                c = choices.setdefault(index * n + ev.index, ChoiceOut())
                c.text += ev.text
                c.tokens += ev.tokens
                c.finish_reason = ev.finish_reason or c.finish_reason
    finally:
        watcher.cancel()
        pending.cancel()
    return choices, pending.usage(), prompts


async def _disconnected(request: Request, pending: Pending) -> None:
    """A non-streaming client that hangs up frees its rows at once."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)
    pending.cancel()


def _json(body: dict) -> JSONResponse:
    from fastapi.responses import JSONResponse

    return JSONResponse(body)  # serialized here (FastAPI's encoder would walk a returned dict on the event loop)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _guarded_stream(pending: Pending, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """SSE lines; an engine error mid-stream becomes an error event; a client that goes away
    cancels its jobs (Starlette cancels this generator on disconnect)."""
    try:
        async for chunk in chunks:
            yield chunk
    except APIError as e:
        yield _sse({"error": {"message": e.message, "type": e.type, "param": None, "code": e.code}})
    finally:
        pending.cancel()
    yield "data: [DONE]\n\n"


# -- /v1/completions ---------------------------------------------------------------------------


async def _completions(served: Served, body: CompletionRequest, request: Request):
    engine, tok = served.ready()
    stack = _stack(served, body)
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, "best_of: only best_of == n is supported", param="best_of")
    items = _prompt_items(body.prompt)
    _check_n(served, body.n, len(items))
    if len(items) > served.settings.max_queue:  # could never be queued: a 429 would invite a retry forever
        raise APIError(400, f"prompt: {len(items)} prompts, over the server's --max-queue", param="prompt")
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens: 0 is only allowed with echo", param="max_tokens")
    params = _sampling(body, tok, max_tokens)
    prompts = await asyncio.to_thread(_prompts, items, tok, engine.max_model_len)  # off the event loop
    for ids, _ in prompts:  # every cheap check before the grammar's compile
        _check_fits(engine, len(ids), max_tokens)
        _check_kv(engine, body.n, len(ids), max_tokens)
    grammar = await _grammar(served, engine, body)
    pending = Pending(engine)
    for ids, _ in prompts:
        scored = body.logprobs if body.echo and body.logprobs is not None else None
        options = dict(logprobs=body.logprobs, prompt_logprobs=scored, ignore_eos=body.ignore_eos, stack=stack)
        options |= dict(grammar=grammar, cache_salt=body.cache_salt)
        pending.add(ids, params, n=body.n, **options)
    pending.submit()
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": _name(served, body)}
    texts = [text if text is not None else tok.decode(ids, skip_special_tokens=False) for ids, text in prompts]
    if body.stream:
        from fastapi.responses import StreamingResponse

        chunks = _stream_completion(pending, body, tok, meta, texts)
        return StreamingResponse(_guarded_stream(pending, chunks), media_type="text/event-stream")
    choices, usage, prompt_infos = await _collect(pending, request, body.n)

    def respond() -> JSONResponse:  # in a thread: echo + logprobs of 64 long prompts is millions of decodes
        out = []
        for index in range(len(prompts) * body.n):
            c, job = choices.get(index, ChoiceOut()), index // body.n
            prefix = texts[job] if body.echo else ""
            infos = (prompt_infos[job] or []) + c.tokens if body.echo else c.tokens
            logprobs = None if body.logprobs is None else _legacy_logprobs(tok, infos, 0)
            out.append(
                {"index": index, "text": prefix + c.text, "logprobs": logprobs, "finish_reason": c.finish_reason}
            )
        return _json({"object": "text_completion", **meta, "choices": out, "usage": usage})

    return await asyncio.to_thread(respond)


async def _stream_completion(pending: Pending, body: CompletionRequest, tok: Tokenizer, meta: dict, texts: list):
    base = {"object": "text_completion", **meta}
    offsets: dict[int, int] = {}
    if body.echo and body.logprobs is None:  # the prompt first, as its own chunk per choice
        for index in range(len(texts) * body.n):
            offsets[index] = len(texts[index // body.n])
            yield _sse(base | {"choices": [_text_choice(index, texts[index // body.n], None, None)]})
    async for job, ev in pending.events():
        indices = range(job * body.n, (job + 1) * body.n) if ev.prompt is not None else [job * body.n + ev.index]
        for index in indices:
            text = texts[job] if ev.prompt is not None else ev.text
            infos = ev.prompt if ev.prompt is not None else ev.tokens
            start = offsets.get(index, 0)
            logprobs = None
            if body.logprobs is not None and ev.prompt is not None:  # a whole echoed prompt: off the event loop
                logprobs = await asyncio.to_thread(_legacy_logprobs, tok, infos, start)
            elif body.logprobs is not None:  # a token or a few: no thread hop per token
                logprobs = _legacy_logprobs(tok, infos, start)
            offsets[index] = start + len(text)
            yield _sse(base | {"choices": [_text_choice(index, text, logprobs, ev.finish_reason)]})
    if body.stream_options and body.stream_options.include_usage:
        yield _sse(base | {"choices": [], "usage": pending.usage()})


def _text_choice(index: int, text: str, logprobs, finish_reason) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def _legacy_logprobs(tok: Tokenizer, infos: list[TokenInfo], start: int) -> dict:
    """OpenAI's legacy completion logprobs; each top_logprobs entry also holds the chosen token."""
    tokens, offsets, top = [], [], []
    for info in infos:
        text = tok.decode([info.id], skip_special_tokens=False)
        tokens.append(text)
        offsets.append(start)
        start += len(text)
        if info.logprob is None:
            top.append(None)
            continue
        alternatives = {tok.decode([i], skip_special_tokens=False): lp for i, lp in info.top}
        top.append(alternatives | {text: info.logprob})
    return {"tokens": tokens, "token_logprobs": [i.logprob for i in infos], "top_logprobs": top, "text_offset": offsets}


# -- /v1/chat/completions ----------------------------------------------------------------------


def _chat_prompt(tok: Tokenizer, messages: list[Message], add_generation_prompt: bool = True) -> str:
    turns = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
        turns.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return render_chat(turns, tok.chat_template, add_generation_prompt)


async def _chat(served: Served, body: ChatRequest, request: Request):
    engine, tok = served.ready()
    stack = _stack(served, body)
    _check_n(served, body.n, 1)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
    limit = engine.max_model_len
    ids = await asyncio.to_thread(lambda: _encode(tok, _chat_prompt(tok, body.messages), "messages", limit))
    if not ids:
        raise APIError(400, "messages: the conversation renders to no tokens", param="messages")
    asked = body.max_completion_tokens or body.max_tokens
    max_tokens = asked if asked is not None else max(engine.max_model_len - len(ids), 1)
    _check_fits(engine, len(ids), max_tokens)
    if asked is None:  # the default fills the context, or as much of it as the KV-cache limit holds
        max_tokens = max(engine.fitting_tokens(body.n, len(ids), max_tokens), 1)
    _check_kv(engine, body.n, len(ids), max_tokens)
    end_of_turn = () if tok.chat_template else ("<|im_end|>",)  # as in `longboi chat`
    pending = Pending(engine)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = _sampling(body, tok, max_tokens, end_of_turn)
    grammar = await _grammar(served, engine, body)  # after every cheap check
    options = dict(
        logprobs=logprobs, ignore_eos=body.ignore_eos, stack=stack, grammar=grammar, cache_salt=body.cache_salt
    )
    pending.add(ids, params, n=body.n, **options)
    pending.submit()
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": _name(served, body)}
    if body.stream:
        from fastapi.responses import StreamingResponse

        chunks = _stream_chat(pending, body, tok, meta)
        return StreamingResponse(_guarded_stream(pending, chunks), media_type="text/event-stream")
    choices, usage, _ = await _collect(pending, request, body.n)

    def respond() -> JSONResponse:  # in a thread: n x tokens x top_logprobs decodes
        out = []
        for index in range(body.n):
            c = choices.get(index, ChoiceOut())
            message = {"role": "assistant", "content": c.text}
            lp = {"content": _chat_logprobs(tok, c.tokens)} if body.logprobs else None
            out.append({"index": index, "message": message, "logprobs": lp, "finish_reason": c.finish_reason})
        return _json({"object": "chat.completion", **meta, "choices": out, "usage": usage})

    return await asyncio.to_thread(respond)


async def _stream_chat(pending: Pending, body: ChatRequest, tok: Tokenizer, meta: dict):
    base = {"object": "chat.completion.chunk", **meta}
    for index in range(body.n):  # the role first, as OpenAI does
        delta = {"role": "assistant", "content": ""}
        yield _sse(base | {"choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]})
    async for _, ev in pending.events():
        lp = {"content": _chat_logprobs(tok, ev.tokens)} if body.logprobs and ev.tokens else None
        delta = {"content": ev.text} if ev.text or ev.finish_reason is None else {}
        choice = {"index": ev.index, "delta": delta, "logprobs": lp, "finish_reason": ev.finish_reason}
        yield _sse(base | {"choices": [choice]})
    if body.stream_options and body.stream_options.include_usage:
        yield _sse(base | {"choices": [], "usage": pending.usage()})


def _chat_logprobs(tok: Tokenizer, infos: list[TokenInfo]) -> list[dict]:
    def entry(token_id: int, logprob: float) -> dict:
        text = tok.decode([token_id], skip_special_tokens=False)  # U+FFFD for part of a character ...
        return {"token": text, "logprob": logprob, "bytes": list(tok.token_bytes(token_id))}  # ... but its own bytes

    return [entry(i.id, i.logprob) | {"top_logprobs": [entry(a, lp) for a, lp in i.top]} for i in infos]
