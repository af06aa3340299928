"""Finetune to serve: two LoRA adapters on the demo model, served with the base from one process.

    make demo && python bench/finetune_to_serve.py [--out bench/results/finetune_to_serve.json]

1. `longboi finetune configs/finetune/instruct-dolly-lora.yaml` (instruction recipe, Dolly sample);
2. `longboi finetune configs/finetune/chat-lora.yaml` (chat recipe, ChatML; the Dolly sample turned into
   one-turn conversations in runs/demo/chat.jsonl, since the shared data has no chat set);
3. `longboi serve runs/demo/train/final --lora instruct=... --lora chat=...`, then the `openai` client calls
   the base, each adapter (the chat adapter through /v1/chat/completions) and the stack "base+instruct+chat";
4. memory: that server's resident set against the base and the two merged adapters served separately.
Prints what each call answered and writes the answers, losses and memory to --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from serve import SHARED, Server  # noqa: E402
from serve_lora import rss_mib  # noqa: E402

DEMO = ROOT / "runs" / "demo"
INSTRUCTION = "### Instruction:\n"


def chat_data(out: Path) -> Path:
    """Dolly's prompt/response pairs as one-turn conversations (user: the instruction, assistant: the response)."""
    rows = []
    for line in (SHARED / "instruct" / "dolly_hhrlhf_small.jsonl").read_text().splitlines():
        row = json.loads(line)
        question = row["prompt"].split(INSTRUCTION)[-1].split("\n\n### Response:")[0].strip()
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": row["response"].strip()}]
        rows.append(json.dumps({"messages": messages}))
    out.write_text("\n".join(rows) + "\n")
    return out


def longboi(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "longboi", *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"longboi {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout + done.stderr


def calls(url: str) -> dict:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    instruct = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName three fruits.\n\n### Response:\n"
    )
    greedy = dict(max_tokens=40, temperature=0)
    out = {"models": [m.id for m in client.models.list().data]}
    out["base"] = client.completions.create(model="base", prompt="ROMEO:", **greedy).choices[0].text
    out["instruct"] = client.completions.create(model="instruct", prompt=instruct, **greedy).choices[0].text
    chat = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "Name three fruits."}], **greedy
    )
    out["chat"] = chat.choices[0].message.content
    out["base+instruct+chat"] = (
        client.completions.create(model="base+instruct+chat", prompt=instruct, **greedy).choices[0].text
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "finetune_to_serve.json"))
    p.add_argument("--chat-data", metavar="PATH", help="only write the chat set (the README's first step) and exit")
    args = p.parse_args()
    if args.chat_data:
        Path(args.chat_data).parent.mkdir(parents=True, exist_ok=True)
        print(f"{chat_data(Path(args.chat_data))}: the Dolly sample as one-turn conversations")
        return
    base = DEMO / "train" / "final"
    if not (base / "config.json").is_file():
        raise SystemExit(f"{base}: run `make demo` first")
    chat_data(DEMO / "chat.jsonl")
    timings = {}
    for recipe in ("instruct-dolly-lora", "chat-lora"):
        start = time.perf_counter()
        log = longboi("finetune", f"configs/finetune/{recipe}.yaml")
        timings[recipe] = {"seconds": time.perf_counter() - start, "log_tail": log.strip().splitlines()[-3:]}
        print(f"{recipe}: {timings[recipe]['seconds']:.0f} s", *timings[recipe]["log_tail"], sep="\n  ")
    adapters = {"instruct": DEMO / "instruct-lora" / "adapter", "chat": DEMO / "chat-lora" / "adapter"}
    lora = [f for name, path in adapters.items() for f in ("--lora", f"{name}={path}")]
    server = Server(base, "--served-model-name", "base", *lora)
    try:
        answers = calls(server.url)
        one = rss_mib(server.proc.pid)
    finally:
        server.stop()
    for name, path in adapters.items():
        longboi("merge", str(base), str(path), str(DEMO / f"{name}-merged"))
    separate = [
        Server(d, "--served-model-name", "base") for d in (base, DEMO / "instruct-merged", DEMO / "chat-merged")
    ]
    try:
        three = sum(rss_mib(s.proc.pid) for s in separate)
    finally:
        for s in separate:
            s.stop()
    for key, value in answers.items():
        print(f"{key}: {value!r}")
    print(f"memory: one server with base + 2 adapters {one:.0f} MiB; base and 2 merged servers {three:.0f} MiB")
    result = {"finetune": timings, "answers": answers, "rss_mib": {"one_server": one, "three_servers": three}}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
