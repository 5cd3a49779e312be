"""Drive a running `orchestrate serve` with the official `openai` client and raw HTTP (httpx).

    python client.py BASE_URL MODEL CHECK [SERVER_PID]

CHECK is one of: api, errors, concurrent, overload, graceful. Each check raises on the first
thing that is wrong (so the process exits non-zero with the reason) and prints what it saw.
"""

import json
import os
import signal
import sys
import threading
import time

import httpx
from openai import OpenAI, APIStatusError

BASE, MODEL, CHECK = sys.argv[1], sys.argv[2], sys.argv[3]
PID = int(sys.argv[4]) if len(sys.argv) > 4 else None
client = OpenAI(base_url=BASE, api_key="not-needed", max_retries=0, timeout=60)
ROOT = BASE.rsplit("/v1", 1)[0]


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


def stream_text(**kw):
    """A streamed completion's text, finish reason and usage (include_usage)."""
    text, finish, usage = "", None, None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.text
            finish = c.finish_reason or finish
    return text, finish, usage


def check_api():
    models = client.models.list()
    expect([m.id for m in models.data] == [MODEL], f"models: {models}")
    kw = dict(model=MODEL, prompt="the cat", max_tokens=12, temperature=0)
    r = client.completions.create(**kw)
    c = r.choices[0]
    expect(r.object == "text_completion" and c.finish_reason in ("length", "stop"), f"completion: {r}")
    expect(r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 12, f"usage: {r.usage}")
    expect(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, f"usage: {r.usage}")
    # Streaming gives the same text (greedy), the same finish and usage.
    text, finish, usage = stream_text(**kw)
    expect((text, finish) == (c.text, c.finish_reason), f"stream {text!r}/{finish} vs {c.text!r}/{c.finish_reason}")
    expect(usage is not None and usage.completion_tokens == r.usage.completion_tokens, f"stream usage {usage}")
    # Chat, plain and streamed.
    msgs = [{"role": "system", "content": "tell a story"}, {"role": "user", "content": "once upon a time"}]
    ch = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    expect(ch.object == "chat.completion" and ch.choices[0].message.role == "assistant", f"chat: {ch}")
    expect(0 < ch.usage.completion_tokens <= 10, f"chat usage: {ch.usage}")
    parts, roles = [], []
    for chunk in client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0, stream=True):
        for c2 in chunk.choices:
            roles.append(c2.delta.role)
            parts.append(c2.delta.content or "")
    expect("".join(parts) == ch.choices[0].message.content, f"chat stream {''.join(parts)!r} vs {ch.choices[0].message.content!r}")
    expect(roles[0] == "assistant", f"first delta carries the role: {roles}")
    # Seeded sampling: the same seed gives the same text, another seed another text.
    seeded = lambda s: client.completions.create(model=MODEL, prompt="the dog", max_tokens=24, temperature=1.0, top_p=0.95, seed=s, extra_body={"top_k": 50}).choices[0].text
    a, b, other = seeded(42), seeded(42), seeded(43)
    expect(a == b, f"seed 42 twice: {a!r} vs {b!r}")
    expect(a != other, f"seeds 42 and 43 gave the same text {a!r}")
    # A stop string ends the text just before it.
    full = client.completions.create(model=MODEL, prompt="the", max_tokens=40, temperature=0).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    if stop.strip():
        s = client.completions.create(model=MODEL, prompt="the", max_tokens=40, temperature=0, stop=[stop]).choices[0]
        expect(s.finish_reason == "stop" and full.startswith(s.text) and stop not in s.text, f"stop {stop!r}: {s}")
        st, sf, _ = stream_text(model=MODEL, prompt="the", max_tokens=40, temperature=0, stop=[stop])
        expect((st, sf) == (s.text, "stop"), f"streamed stop: {st!r}/{sf} vs {s.text!r}")
    health = httpx.get(f"{ROOT}/health").json()
    expect(health["status"] == "ok", f"health {health}")
    print("api ok:", repr(c.text), repr(ch.choices[0].message.content), repr(a))


def error_of(r, status, param=None, code=None):
    expect(r.status_code == status, f"expected {status}, got {r.status_code}: {r.text}")
    e = r.json()["error"]
    expect(e["message"] and e["type"], f"error body {e}")
    if param:
        expect(e["param"] == param, f"param {e}")
    if code:
        expect(e["code"] == code, f"code {e}")
    return e


def check_errors():
    url = f"{BASE}/completions"
    post = lambda body, **kw: httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30, **kw)
    ok = {"model": MODEL, "prompt": "the cat", "max_tokens": 4}
    error_of(post(b'{"model": '), 400)
    error_of(post(json.dumps({**ok, "max_tokens": "ten"}).encode()), 400)
    error_of(post(json.dumps({**ok, "model": "gpt-4"}).encode()), 404, "model", "model_not_found")
    error_of(post(json.dumps({**ok, "max_tokens": 100000}).encode()), 400, "max_tokens")
    error_of(post(json.dumps({**ok, "prompt": ""}).encode()), 400, "prompt")
    error_of(post(json.dumps({**ok, "temperature": 9}).encode()), 400, "temperature")
    error_of(post(json.dumps({**ok, "prompt": "the " * 5000}).encode()), 400, "prompt", "context_length_exceeded")
    error_of(post(b'{"model": "' + MODEL.encode() + b'", "prompt": "\xff\xfe"}'), 400)
    error_of(post(b"{" + b" " * (2 << 20) + b"}"), 413, code="request_too_large")
    error_of(httpx.post(f"{BASE}/chat/completions", json={"model": MODEL, "messages": []}), 400, "messages")
    error_of(httpx.post(f"{BASE}/chat/completions", json={"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}), 400, "messages")
    error_of(httpx.get(f"{ROOT}/v2/nothing"), 404)
    # The official client raises the same errors as typed exceptions.
    try:
        client.completions.create(model="nope", prompt="x")
        raise AssertionError("unknown model accepted")
    except APIStatusError as e:
        expect(e.status_code == 404, f"{e}")
    # A client that goes away mid-stream: the server drops that sequence and keeps serving.
    with httpx.stream("POST", url, json={**ok, "max_tokens": 200, "stream": True}, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break
    r = client.completions.create(**ok)
    expect(r.usage.completion_tokens > 0, f"after a disconnect: {r}")
    metrics = httpx.get(f"{ROOT}/metrics").text
    for needle in ['status="400"', 'status="404"', 'status="413"', "orchestrate_serve_generated_tokens_total"]:
        expect(needle in metrics, f"/metrics lacks {needle}:\n{metrics}")
    print("errors ok")


def check_concurrent():
    """32 concurrent streams, each seeded: every one ends, with the text it gets alone."""
    n, results, errors = 32, {}, []

    def one(i):
        try:
            results[i] = stream_text(model=MODEL, prompt=f"story {i}", max_tokens=20, temperature=0.8, seed=i)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{i}: {e!r}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expect(not errors, f"errors: {errors}")
    for i in range(n):
        text, finish, usage = results[i]
        expect(finish in ("length", "stop") and usage is not None, f"{i}: {results[i]}")
        expect(finish == "stop" or usage.completion_tokens == 20, f"{i}: length finish with {usage}")
        alone = client.completions.create(model=MODEL, prompt=f"story {i}", max_tokens=20, temperature=0.8, seed=i)
        expect(alone.choices[0].text == text, f"{i}: batched {text!r} vs alone {alone.choices[0].text!r}")
        expect(alone.usage.completion_tokens == usage.completion_tokens, f"{i}: token counts")
    metrics = httpx.get(f"{ROOT}/metrics").text
    values = {l.rsplit(" ", 1)[0]: float(l.rsplit(" ", 1)[1]) for l in metrics.splitlines() if l.startswith("orchestrate_serve_batch_size_")}
    steps, single = values["orchestrate_serve_batch_size_count"], values['orchestrate_serve_batch_size_bucket{le="1.0"}']
    expect(single < steps, f"no step decoded two sequences together:\n{metrics}")
    mean = values["orchestrate_serve_batch_size_sum"] / steps
    print(f"concurrent ok: {n} streams; {steps - single:.0f} of {steps:.0f} steps batched, mean batch {mean:.2f}")


def check_overload():
    """With one sequence at a time and a queue of one, a burst gets 503 (with Retry-After), not a hang."""
    codes, lock = [], threading.Lock()

    def one():
        r = httpx.post(f"{BASE}/completions", json={"model": MODEL, "prompt": "the", "max_tokens": 60}, timeout=60)
        with lock:
            codes.append((r.status_code, r.headers.get("retry-after"), r.json()))

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    busy = [c for c in codes if c[0] == 503]
    expect(busy and all(c[1] == "1" and c[2]["error"]["code"] == "overloaded" for c in busy), f"{codes}")
    expect(any(c[0] == 200 for c in codes), f"nothing served: {codes}")
    r = client.completions.create(model=MODEL, prompt="the", max_tokens=4)
    expect(r.usage.completion_tokens > 0, "serving again after the burst")
    print(f"overload ok: {len(busy)} of {len(codes)} refused with 503")


def check_graceful():
    """SIGTERM during a stream: the stream still ends with [DONE]; then the server is gone."""
    lines = []
    with httpx.stream("POST", f"{BASE}/completions", json={"model": MODEL, "prompt": "the", "max_tokens": 100, "stream": True, "temperature": 0}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line)
                if len(lines) == 1:
                    os.kill(PID, signal.SIGTERM)
    expect(lines[-1] == "data: [DONE]", f"the stream was cut: {lines[-3:]}")
    expect(json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop"), f"{lines[-2]}")
    for _ in range(100):
        try:
            httpx.get(f"{ROOT}/health", timeout=1)
            time.sleep(0.05)
        except httpx.TransportError:
            print(f"graceful ok: {len(lines)} events, then the server stopped")
            return
    raise AssertionError("the server still answers after SIGTERM")


{"api": check_api, "errors": check_errors, "concurrent": check_concurrent, "overload": check_overload, "graceful": check_graceful}[CHECK]()
