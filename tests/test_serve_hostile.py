"""`longboi serve` under hostile clients: malformed and extreme requests sent while innocent streams run,
faults injected into the engine for one request, memory that follows the work, and the HTTP guard
(content types, chunked bodies, Host headers). No request may fail, slow or starve another."""

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import build, small_config
from test_serve import KEY, Server, post, serving

from longboi.checkpoint import save_checkpoint
from longboi.config import preset
from longboi.generate import SamplingParams
from longboi.serve.engine import Engine, Job
from longboi.tokenizer import Tokenizer

C, CHAT, TOKENIZE = "/v1/completions", "/v1/chat/completions", "/tokenize"
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(ckpt):
    yield from serving(ckpt, "--api-key", KEY, "--max-batch", "64", "--max-model-len", "1024", "--dtype", "fp32")


def deep(n: int) -> str:
    return "[" * n + "]" * n


def chunks(total: int, size: int = 2**20):
    for _ in range(total // size):
        yield b"x" * size


# (what, method, path, body, extra headers, expected status). Bodies given as str/bytes are sent as they are.
HOSTILE = [
    ("seed 2^64", "POST", C, {"prompt": "a", "seed": 18446744073709551616}, {}, 400),
    ("seed -2^70", "POST", C, {"prompt": "a", "seed": -(2**70)}, {}, 400),
    ("seed 2^63", "POST", C, {"prompt": "a", "seed": 2**63}, {}, 400),
    ("temperature NaN", "POST", C, '{"prompt": "a", "temperature": NaN}', {}, 400),
    ("temperature Infinity", "POST", C, '{"prompt": "a", "temperature": Infinity}', {}, 400),
    ("temperature 1e400", "POST", C, '{"prompt": "a", "temperature": 1e400}', {}, 400),
    ("temperature -1e-45", "POST", C, {"prompt": "a", "temperature": -1e-45}, {}, 400),
    ("repetition_penalty 1e-300", "POST", C, {"prompt": "a", "repetition_penalty": 1e-300}, {}, 400),
    ("top_p NaN", "POST", C, '{"prompt": "a", "top_p": NaN}', {}, 400),
    ("presence -Infinity", "POST", C, '{"prompt": "a", "presence_penalty": -Infinity}', {}, 400),
    ("logit_bias value NaN", "POST", C, '{"prompt": "a", "logit_bias": {"5": NaN}}', {}, 400),
    ("logit_bias superscript key", "POST", C, {"prompt": "a", "logit_bias": {"²": 1}}, {}, 400),
    ("logit_bias arabic digit key", "POST", C, {"prompt": "a", "logit_bias": {"٣": 1}}, {}, 400),
    ("logit_bias negative key", "POST", C, {"prompt": "a", "logit_bias": {"-1": 1}}, {}, 400),
    ("logit_bias key with space", "POST", C, {"prompt": "a", "logit_bias": {" 5": 1}}, {}, 400),
    ("logit_bias key past vocab", "POST", C, {"prompt": "a", "logit_bias": {"9999999999": 1}}, {}, 400),
    ("logit_bias value 101", "POST", C, {"prompt": "a", "logit_bias": {"5": 101}}, {}, 400),
    ("logit_bias 301 entries", "POST", C, {"prompt": "a", "logit_bias": {str(i): 1 for i in range(301)}}, {}, 400),
    ("stop 17 strings", "POST", C, {"prompt": "a", "stop": [f"s{i}" for i in range(17)]}, {}, 400),
    ("stop of 257 characters", "POST", C, {"prompt": "a", "stop": "x" * 257}, {}, 400),
    ("stop empty", "POST", C, {"prompt": "a", "stop": ""}, {}, 400),
    ("n 129", "POST", C, {"prompt": "a", "n": 129}, {}, 400),
    ("n x prompts past max_batch", "POST", C, {"prompt": ["a", "b"], "n": 33}, {}, 400),
    ("logprobs 21", "POST", C, {"prompt": "a", "logprobs": 21}, {}, 400),
    (
        "top_logprobs 21",
        "POST",
        CHAT,
        {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
        {},
        400,
    ),
    ("max_tokens 2^70", "POST", C, {"prompt": "a", "max_tokens": 2**70}, {}, 400),
    ("top_k 2^40", "POST", C, {"prompt": "a", "top_k": 2**40}, {}, 400),
    ("best_of 1000", "POST", C, {"prompt": "a", "best_of": 1000}, {}, 400),
    ("token id 2^31 + 1", "POST", C, {"prompt": [1, 2, 2**31 + 1]}, {}, 400),
    ("token id as float", "POST", C, {"prompt": [1.5]}, {}, 400),
    ("prompt an object", "POST", C, {"prompt": {"a": 1}}, {}, 400),
    ("5,000 prompts", "POST", C, {"prompt": ["a"] * 5000}, {}, 400),
    ("a million token ids", "POST", C, {"prompt": [0] * 1_000_000}, {}, 400),
    ("messages a string", "POST", CHAT, {"messages": "hi"}, {}, 400),
    ("message content a number", "POST", CHAT, {"messages": [{"role": "user", "content": 5}]}, {}, 400),
    ("4 MB of prompt text", "POST", C, {"prompt": "word " * 800_000}, {}, 400),
    ("4 MB chat message", "POST", CHAT, {"messages": [{"role": "user", "content": "word " * 800_000}]}, {}, 400),
    ("5,000 messages", "POST", CHAT, {"messages": [{"role": "user", "content": "x"}] * 5000}, {}, 400),
    ("user of 1,000 characters", "POST", C, {"prompt": "a", "user": "u" * 1000}, {}, 400),
    ("unknown model, long name", "POST", C, {"prompt": "a", "model": "m" * 10_000}, {}, 400),
    ("deep JSON body", "POST", C, deep(100_000), {}, 400),
    ("deep JSON prompt", "POST", C, '{"prompt": ' + deep(5_000) + "}", {}, 400),
    ("bad UTF-8", "POST", C, b'{"prompt": "\xff\xfe\xfa"}', {}, 400),
    ("lone surrogate", "POST", C, '{"prompt": "a\\ud800b"}', {}, 400),
    ("lone surrogate in chat", "POST", CHAT, '{"messages": [{"role": "user", "content": "\\udfff"}]}', {}, 400),
    ("lone surrogate to tokenize", "POST", TOKENIZE, '{"prompt": "\\ud800"}', {}, 400),
    ("trailing garbage", "POST", C, '{"prompt": "a"} x', {}, 400),
    ("null body", "POST", C, "null", {}, 400),
    ("string body", "POST", C, '"prompt"', {}, 400),
    ("stream_options wrong type", "POST", C, {"prompt": "a", "stream_options": {"include_usage": "yes"}}, {}, 400),
    ("text/plain", "POST", C, {"prompt": "a"}, {"Content-Type": "text/plain"}, 415),
    ("form", "POST", C, "prompt=a", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ("multipart", "POST", C, "--b--", {"Content-Type": "multipart/form-data; boundary=b"}, 415),
    ("no content type", "POST", C, {"prompt": "a"}, {"Content-Type": ""}, 415),
    ("json lookalike type", "POST", C, {"prompt": "a"}, {"Content-Type": "application/jsonx"}, 415),
    ("9 MiB body", "POST", C, "x" * (9 * 2**20), {}, 413),
    ("9 MiB chunked body", "POST", C, chunks, {}, 413),
    ("Content-Length lies big", "POST", C, {"prompt": "a"}, {"Content-Length": str(2**40)}, 413),
    ("DNS rebinding Host", "POST", C, {"prompt": "a"}, {"Host": "evil.example:8000"}, 400),
    ("wrong API key", "POST", C, {"prompt": "a"}, {"Authorization": "Bearer nope"}, 401),
    ("GET on a POST route", "GET", C, None, {}, 405),
    ("unknown route", "POST", "/v1/embeddings", {"input": "a"}, {}, 404),
    ("detokenize negative id", "POST", "/detokenize", {"tokens": [-1]}, {}, 400),
    (
        "tokenize both prompt and messages",
        "POST",
        TOKENIZE,
        {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
        {},
        400,
    ),
]

# At the limits, and valid: each must succeed (200) while everything else goes on.
AT_LIMITS = [
    {"prompt": "a", "temperature": 1e-45, "max_tokens": 4},
    {"prompt": "a", "temperature": 5e-324, "max_tokens": 4, "top_p": 0.5},
    {"prompt": "a", "temperature": 100, "max_tokens": 4, "seed": 2**63 - 1},
    {"prompt": "a", "max_tokens": 4, "seed": -(2**63), "temperature": 1},
    {"prompt": "a", "max_tokens": 4, "logit_bias": {str(i): 100 if i % 2 else -100 for i in range(300)}},
    {"prompt": "a", "max_tokens": 4, "stop": ["y" * 256] * 16},
    {"prompt": "a", "max_tokens": 4, "logprobs": 20, "echo": True},
    {"prompt": "a", "max_tokens": 4, "top_k": 2**31, "presence_penalty": 2, "frequency_penalty": -2},
    {"prompt": "a a a", "max_tokens": 4, "temperature": 1, "repetition_penalty": 0.01, "top_p": 1e-300},
    {"prompt": "a a a", "max_tokens": 4, "temperature": 1e-3, "repetition_penalty": 100, "seed": 1},
    {"prompt": ["a"] * 2, "max_tokens": 2, "n": 32},
]


def send(server, method: str, path: str, body, headers: dict) -> httpx.Response:
    sent = {"Authorization": f"Bearer {KEY}"} | JSON | headers
    sent = {k: v for k, v in sent.items() if v != ""}  # "" removes a header
    if body is chunks:  # a generator: httpx sends it chunked, with no Content-Length
        return httpx.post(f"{server.url}{path}", content=chunks(9 * 2**20), headers=sent, timeout=30)
    content = None if body is None else body if isinstance(body, (str, bytes)) else json.dumps(body)
    if "Content-Length" in headers:  # a lie (the body is shorter than announced): no HTTP client sends it
        return raw_request(server, method, path, content.encode(), sent)
    with httpx.Client(timeout=30) as client:
        return client.send(httpx.Request(method, f"{server.url}{path}", content=content, headers=sent))


def raw_request(server, method: str, path: str, body: bytes, headers: dict) -> httpx.Response:
    """Headers exactly as given, over a plain socket; the answer parsed back into an httpx.Response."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, content = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return httpx.Response(status, content=content, headers={"Content-Type": "application/json"})


def parse_only(server, body) -> float:
    """Seconds the loaded server takes to read and refuse a body of the same size that is not JSON at its
    last byte: what any body of that size costs on this machine now, whatever the request asks. A
    hostile request may take a few times that; more means the server worked on what it asked for."""
    if body is None or body is chunks:  # no body, or one refused by size before it is read whole
        return 0.0
    size = len(body if isinstance(body, bytes) else body.encode() if isinstance(body, str) else json.dumps(body))
    if size < 64 * 1024:
        return 0.0
    junk = (b"[" + b"0," * size)[: size - 1] + b"}"  # parses to the end, then fails
    start = time.monotonic()
    r = httpx.post(f"{server.url}{C}", content=junk, headers={"Authorization": f"Bearer {KEY}"} | JSON, timeout=30)
    assert r.status_code in (400, 413), r.text[:200]  # 413: over --max-body-bytes, refused unread
    return time.monotonic() - start


def stream_text(server, prompt: str, tokens: int, out: dict, key: int) -> None:
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    pieces, headers = [], {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server.url}{C}", json=body, headers=headers, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                pieces.append(json.loads(line[6:]))
    out[key] = (r.status_code, pieces, time.monotonic())


def run_streams(server, tokens: int) -> tuple[dict, list[threading.Thread]]:
    out: dict = {}
    threads = [
        threading.Thread(target=stream_text, args=(server, f"Stream {i} begins with", tokens, out, i))
        for i in range(32)
    ]
    for t in threads:
        t.start()
    return out, threads


def texts(out: dict) -> list[str]:
    return ["".join(c["choices"][0]["text"] for c in out[i][1] if c.get("choices")) for i in range(32)]


def test_hostile_requests_during_32_streams_get_4xx_fast_and_the_streams_are_untouched(server):
    assert len(HOSTILE) >= 40
    clean, threads = run_streams(server, 400)
    for t in threads:
        t.join()
    assert all(clean[i][0] == 200 for i in range(32))
    busy, threads = run_streams(server, 400)
    time.sleep(0.5)  # the streams are decoding
    slow, wrong = [], []
    for what, method, path, body, headers, status in HOSTILE:
        start = time.monotonic()
        r = send(server, method, path, body, headers)
        took = time.monotonic() - start
        if r.status_code != status or (status >= 400 and "error" not in r.json() and status not in (404, 405)):
            wrong.append((what, r.status_code, r.text[:200]))
        bound = max(1.0, 3 * parse_only(server, body))
        if took > bound:
            slow.append((what, round(took, 2), round(bound, 2)))
    for body in AT_LIMITS:
        r = post(server, C, body)
        if r.status_code != 200:
            wrong.append((json.dumps(body)[:80], r.status_code, r.text[:200]))
    hostile_done = time.monotonic()
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    for t in threads:
        t.join()
    assert not wrong, wrong
    assert not slow, slow
    assert min(busy[i][2] for i in range(32)) > hostile_done  # every stream ran through the whole barrage
    assert texts(busy) == texts(clean)
    assert all(busy[i][1][-1]["choices"][0]["finish_reason"] == "length" for i in range(32))


# -- faults injected into the engine for one request ------------------------------------------------


def collect(engine: Engine, prompts: list[list[int]], params: SamplingParams, chosen_prompt: list[int]):
    """16 streams and one chosen job; returns (tokens per stream, the chosen job's error and its delay)."""
    results: dict = {}
    done = threading.Semaphore(0)

    def sink_for(key):
        def sink(ev):
            entry = results.setdefault(key, {"tokens": [], "error": None, "at": None})
            entry["tokens"] += [t.id for t in ev.tokens]
            if ev.done:
                entry["error"], entry["at"] = ev.error, time.monotonic()
                done.release()

        return sink

    jobs = [Job(p, params, sink_for(i)) for i, p in enumerate(prompts)]
    chosen = Job(chosen_prompt, params, sink_for("chosen"))
    for job in jobs[:8] + [chosen] + jobs[8:]:
        engine.submit(job)
    for _ in range(len(jobs) + 1):
        assert done.acquire(timeout=60), "a job never ended"
    return [results[i]["tokens"] for i in range(len(prompts))], results["chosen"], chosen


def inject(engine: Engine, where: str, chosen: list):
    """Make one engine stage raise for the chosen job (chosen[0], set once it is known)."""
    is_chosen = lambda job: chosen and job is chosen[0]

    def boom():
        chosen.append(time.monotonic())  # when it failed (after the job object)
        raise RuntimeError(f"injected fault in {where}")

    if where in ("prefill", "decode"):
        real_forward = engine._forward

        def failing(p) -> bool:  # a later piece of its prompt, or its decode once it has 3 tokens
            if not is_chosen(p.seq.owner.job):
                return False
            return p.start > 0 and not p.decode if where == "prefill" else p.decode and len(p.seq.owner.tokens) >= 3

        def forward(pieces):
            if any(failing(p) for p in pieces):
                boom()
            return real_forward(pieces)

        engine._forward = forward
    elif where == "intake":  # taking the job in: its grammar matcher, its adapter stack
        real_sequence = engine._sequence

        def sequence(job, index, seq):
            if is_chosen(job):
                boom()
            return real_sequence(job, index, seq)

        engine._sequence = sequence
    elif where == "start":
        real_start = engine._start

        def start(s, logits):
            if is_chosen(s.job):
                boom()
            return real_start(s, logits)

        engine._start = start
    else:
        real_sample = engine._sample

        def sample(seqs, logits):
            if any(is_chosen(s.job) and len(s.tokens) >= 5 for s in seqs):
                boom()
            return real_sample(seqs, logits)

        engine._sample = sample


@pytest.mark.parametrize("where", ["intake", "prefill", "start", "decode", "sampling"])
def test_a_fault_for_one_job_fails_it_alone_and_16_others_finish_as_in_a_clean_run(tokenizer_path, where):
    tok = Tokenizer(tokenizer_path)
    model = build(small_config(max_seq_len=128), seed=3)
    prompts = [tok.encode(f"Request {i} talks about the sea and") for i in range(16)]
    chosen_prompt = tok.encode("The chosen one has a longer prompt than the others, so it prefills in pieces")
    params = SamplingParams(max_new_tokens=24, temperature=0.9, top_k=40, seed=7)  # a rerun must draw the same
    clean_engine = Engine(model, tok, max_batch=32, prefill_chunk=8).start()
    try:
        clean, chosen_clean, _ = collect(clean_engine, prompts, params, chosen_prompt)
    finally:
        clean_engine.stop()
    assert chosen_clean["error"] is None and len(chosen_clean["tokens"]) == 24
    engine = Engine(model, tok, max_batch=32, prefill_chunk=8)
    chosen: list = []
    inject(engine, where, chosen)
    real_submit = engine.submit
    engine.submit = lambda job: (chosen.insert(0, job) if job.prompt == chosen_prompt else None, real_submit(job))
    engine.start()
    try:
        streams, failed, _ = collect(engine, prompts, params, chosen_prompt)
        assert streams == clean  # every other job, token for token
        assert failed["error"] and f"injected fault in {where}" in failed["error"]
        assert failed["at"] - chosen[1] < 1.0  # its error came at once
        assert not engine.jobs and not engine.sequences  # nothing left behind
        assert not engine.scheduler.running and not engine.scheduler.waiting
        again, ok, _ = collect(engine, prompts[:2], params, prompts[2])  # the engine still serves
        assert again == clean[:2]
    finally:
        engine.stop()


def test_a_client_that_hangs_up_on_a_non_streamed_request_ends_it(ckpt):
    """The handler stops waiting (the engine sends a cancelled job nothing more): its row is freed, and
    Ctrl-C does not sit out the 30 s graceful-shutdown timeout for it."""
    s = Server(ckpt, "--max-model-len", "4096", "--dtype", "fp32")
    body = {"prompt": "hang up", "max_tokens": 4000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{s.url}{C}", json=body, timeout=1.5)
    deadline = time.monotonic() + 10
    while "longboi_requests_running 0" not in httpx.get(f"{s.url}/metrics").text:
        assert time.monotonic() < deadline, "the row was never freed"
        time.sleep(0.1)
    start = time.monotonic()
    code, out = s.stop()
    assert code == 0 and time.monotonic() - start < 15, out


# -- memory that follows the work ------------------------------------------------------------------


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def kv_gauge(server) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("longboi_kv_cache_bytes "):
            return float(line.split()[1])
    raise AssertionError("no kv_cache_bytes gauge")


def test_memory_follows_a_1500_token_request_on_a_125m_model_and_is_given_back(tmp_path, tokenizer_path):
    """mpt-125m's shape (random weights), --max-batch 64 and --max-model-len 2048, as in the report where one
    1,500-token prompt took the server from 0.35 to 7.8 GB and kept it there."""
    path = tmp_path / "mpt-125m"
    torch.manual_seed(0)
    from longboi.model import MPTForCausalLM

    save_checkpoint(MPTForCausalLM(preset("mpt-125m")).eval(), path, Tokenizer(tokenizer_path))
    s = Server(path, "--max-model-len", "2048", "--dtype", "fp32")
    try:
        warm = post(s, C, {"prompt": "warm up", "max_tokens": 2}, key=None)
        assert warm.status_code == 200
        time.sleep(1.0)
        before = rss(s.proc.pid)
        peak = {"rss": before, "kv": 0.0}
        done = threading.Event()

        def watch():
            while not done.is_set():
                peak["rss"] = max(peak["rss"], rss(s.proc.pid))
                peak["kv"] = max(peak["kv"], kv_gauge(s))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        r = post(s, C, {"prompt": [50] * 1500, "max_tokens": 8, "temperature": 0}, key=None)
        done.set()
        watcher.join()
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 1500
        time.sleep(1.0)  # the engine goes idle
        after = rss(s.proc.pid)
        per_token = 2 * 12 * 768 * 4  # keys and values, 12 layers, d_model 768, fp32
        print(
            f"RSS before {before / 2**20:.0f} MiB, peak {peak['rss'] / 2**20:.0f} MiB, after {after / 2**20:.0f} MiB; "
            f"KV cache peak {peak['kv'] / 2**20:.0f} MiB for 1,508 positions ({1508 * per_token / 2**20:.0f} MiB)"
        )
        assert kv_gauge(s) == 0  # idle: the cache is gone
        assert peak["kv"] <= 1.5 * 1508 * per_token  # one row at its own length, not 64 rows at twice it
        assert after - before < 250 * 2**20  # given back (was +7.4 GB)
    finally:
        s.stop()


def test_a_kv_cache_limit_queues_requests_and_refuses_one_that_never_fits(ckpt):
    # tiny model: 2 layers x 4 heads x 16 dims x 2 (k, v) x 4 bytes = 1 KiB per position, 16 KiB per block
    # of 16; 64 KiB is 4 blocks: a request of ~4 prompt tokens + 40 needs 3 at its longest, so at most 4 run
    # at once (one block each) and they preempt one another as they grow
    s = Server(ckpt, "--kv-cache-memory", "64KiB", "--max-model-len", "1024", "--dtype", "fp32")
    try:
        bodies = [{"prompt": f"Queued request {i}", "max_tokens": 40, "temperature": 0} for i in range(6)]
        alone = [post(s, C, b, key=None).json()["choices"][0]["text"] for b in bodies]
        results: list = [None] * 6
        running_seen = []

        def one(i):
            results[i] = post(s, C, bodies[i], key=None)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            text = httpx.get(f"{s.url}/metrics").text
            running_seen += [
                float(x.split()[1]) for x in text.splitlines() if x.startswith("longboi_requests_running ")
            ]
            time.sleep(0.01)
        for t in threads:
            t.join()
        assert [r.status_code for r in results] == [200] * 6
        assert [r.json()["choices"][0]["text"] for r in results] == alone  # queued, then served as alone
        assert max(running_seen) <= 4
        too_big = post(s, C, {"prompt": "x", "max_tokens": 1000}, key=None)
        assert too_big.status_code == 400 and "kv-cache-memory" in too_big.json()["error"]["message"]
        assert too_big.json()["error"]["param"] == "max_tokens"
    finally:
        s.stop()


# -- the guard ---------------------------------------------------------------------------------------


def test_host_header_must_name_this_server(server):
    ok = send(server, "POST", C, {"prompt": "a", "max_tokens": 1}, {"Host": f"localhost:{server.port}"})
    assert ok.status_code == 200
    for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example", "[::2]:8000"):
        r = send(server, "GET", "/v1/models", None, {"Host": host})
        assert r.status_code == 400 and r.json()["error"]["param"] == "host", host
    assert send(server, "GET", "/health", None, {"Host": "evil.example"}).status_code == 400  # even the open routes


def test_chat_logprob_bytes_are_each_tokens_own_bytes(tokenizer_path):
    """A byte-level token that is a third of an emoji decodes alone to U+FFFD; its bytes are its own."""
    from longboi.serve.api import _chat_logprobs
    from longboi.serve.engine import TokenInfo

    tok = Tokenizer(tokenizer_path)
    text = "😀 and    spaces\tand ü<|endoftext|>"
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
    a, b, c = tok.encode("😀")
    entries = _chat_logprobs(tok, [TokenInfo(a, -1.0, ((b, -2.0),)), TokenInfo(c, -0.5)])
    first = bytes(entries[0]["bytes"])
    assert entries[0]["token"] == "\ufffd" and first and "😀".encode().startswith(first)
    assert bytes(entries[0]["bytes"] + entries[0]["top_logprobs"][0]["bytes"] + entries[1]["bytes"]) == "😀".encode()


def test_serve_limits_from_the_command_line(ckpt, capsys):
    from longboi.cli import _allowed_hosts, main
    from longboi.serve.api import parse_kv_cache_memory as parse

    assert parse("4GiB") == 4 * 2**30 and parse("512 MiB") == 512 * 2**20
    assert parse("1e9") == 10**9 and parse("none") is None and parse("auto") == "auto"
    for bad in ("lots", "-1GiB", "0", "4 parsecs"):
        assert main(["serve", str(ckpt), f"--kv-cache-memory={bad}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --kv-cache-memory") and "\n" not in err
    assert "localhost" in _allowed_hosts("127.0.0.1", None) and "*" not in _allowed_hosts("127.0.0.1", None)
    assert "127.0.0.2" in _allowed_hosts("127.0.0.2", None)
    assert _allowed_hosts("0.0.0.0", None) == ("*",) and _allowed_hosts("0.0.0.0", ["Api.Example"]) == ("api.example",)
    assert _allowed_hosts("::", ["::1", "a.example:8000", "[::2]:80", "*"]) == ("[::1]", "a.example", "[::2]", "*")
    for flags, said in (
        (["--enable-lora"], "--enable-lora reads adapters from paths clients send: give --lora-root"),
        (["--lora-root", str(ckpt)], "--lora-root is where run-time adapter loads read from: it needs --enable-lora"),
        (["--enable-lora", "--lora-root", str(ckpt / "nope")], "not a directory"),
        (["--grammar-timeout", "0"], "--grammar-timeout must be a positive number of seconds, got 0"),
    ):
        assert main(["serve", str(ckpt), *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert said in err and "\n" not in err


def test_a_body_nested_past_the_limit_is_refused_before_any_parser_sees_it():
    """The guard counts brackets outside strings (escaped quotes included) at C speed: 128 levels pass,
    129 are refused, brackets in strings do not count. (The hostile test above times a 100,000-level body.)"""
    from longboi.serve.api import MAX_JSON_DEPTH, _nesting_rejection

    assert MAX_JSON_DEPTH == 128
    assert _nesting_rejection(deep(128).encode()) is None
    refused = _nesting_rejection(deep(129).encode())
    assert refused is not None and refused.status_code == 400
    assert json.loads(refused.body)["error"]["message"] == "the body nests 129 levels deep; at most 128 are accepted"
    in_strings = json.dumps({"prompt": "[" * 5000 + '\\"{' * 300, "stop": ["]]]"]}).encode()
    assert _nesting_rejection(in_strings) is None
    wide = json.dumps({"prompt": [[1]] * 5000}).encode()  # many brackets, depth 2
    assert _nesting_rejection(wide) is None
    assert b"4,000,000 levels" in _nesting_rejection(deep(4_000_000).encode()).body  # the 8 MB limit's deepest
