"""Drive a running `orchestrate serve` with the official `openai` client and raw HTTP (httpx).

    python client.py BASE_URL MODEL CHECK [SERVER_PID]

CHECK is one of: api, errors, logprobs, concurrent, overload, graceful, card. Each check raises
on the first thing that is wrong (so the process exits non-zero with the reason) and prints what
it saw. `logprobs` reads PROBE_TEXT (a file) and PROBE_NATS (the evaluate stage's nats/token on
it); `card` reads CREATED_FROM (Unix seconds or an ISO 8601 time) and CREATED_SPAN (seconds).
"""

import json
import os
import signal
import sys
import threading
import time
from datetime import datetime

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
    # One system_fingerprint for every answer of this server, chunks included.
    fp = r.system_fingerprint
    expect(fp and fp.startswith("fp_") and ch.system_fingerprint == fp, f"fingerprints {fp!r} / {ch.system_fingerprint!r}")
    chunks = client.completions.create(stream=True, **kw)
    expect({c.system_fingerprint for c in chunks} == {fp}, "every chunk carries the fingerprint")
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
    # n choices: each its own seed (seed + i), so choice 0 is the n = 1 answer; usage sums
    # the choices' tokens and counts the prompt once; streamed, every chunk names its choice.
    kw = dict(model=MODEL, prompt="the dog", max_tokens=24, temperature=1.0, top_p=0.95, seed=42, extra_body={"top_k": 50})
    three = client.completions.create(n=3, **kw)
    texts = [c.text for c in sorted(three.choices, key=lambda c: c.index)]
    expect([c.index for c in three.choices] == [0, 1, 2] and texts[0] == a, f"n=3: {three.choices} vs {a!r}")
    expect(texts[1] == client.completions.create(**{**kw, "seed": 43}).choices[0].text, f"choice 1 is seed 43: {texts}")
    one = client.completions.create(**kw)
    expect(three.usage.prompt_tokens == one.usage.prompt_tokens, f"prompt counted once: {three.usage}")
    expect(three.usage.completion_tokens == sum(client.completions.create(**{**kw, "seed": 42 + i}).usage.completion_tokens for i in range(3)), f"{three.usage}")
    streamed, closed = ["", "", ""], []
    for chunk in client.completions.create(stream=True, n=3, stream_options={"include_usage": True}, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.text
            closed += [c.index] if c.finish_reason else []
        if chunk.usage:
            expect(chunk.usage.completion_tokens == three.usage.completion_tokens, f"streamed usage {chunk.usage}")
    expect(streamed == texts and sorted(closed) == [0, 1, 2], f"streamed n=3: {streamed} {closed} vs {texts}")
    chat3 = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0, n=2)
    expect([c.index for c in chat3.choices] == [0, 1], f"chat n=2: {chat3.choices}")
    expect(chat3.choices[0].message.content == chat3.choices[1].message.content, "greedy choices agree")
    expect(client.models.retrieve(MODEL).id == MODEL, "GET /v1/models/{model}")
    error_of(httpx.get(f"{BASE}/models/gpt-4"), 404, "model", "model_not_found")
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
    error_of(post(json.dumps({**ok, "max_tokens": "ten"}).encode()), 400, "max_tokens")
    error_of(post(b"[1, 2]"), 400)
    error_of(post(json.dumps({**ok, "model": "gpt-4"}).encode()), 404, "model", "model_not_found")
    error_of(post(json.dumps({**ok, "max_tokens": 100000}).encode()), 400, "max_tokens")
    error_of(post(json.dumps({**ok, "prompt": ""}).encode()), 400, "prompt")
    error_of(post(json.dumps({**ok, "temperature": 9}).encode()), 400, "temperature")
    error_of(post(json.dumps({**ok, "n": 0}).encode()), 400, "n")
    error_of(post(json.dumps({**ok, "n": 17}).encode()), 400, "n")
    error_of(post(json.dumps({**ok, "prompt": "the " * 5000}).encode()), 400, "prompt", "context_length_exceeded")
    error_of(post(b'{"model": "' + MODEL.encode() + b'", "prompt": "\xff\xfe"}'), 400)
    error_of(post(b"{" + b" " * (2 << 20) + b"}"), 413, code="request_too_large")
    error_of(httpx.post(f"{BASE}/chat/completions", json={"model": MODEL, "messages": []}), 400, "messages")
    error_of(httpx.post(f"{BASE}/chat/completions", json={"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}), 400, "messages")
    error_of(httpx.get(f"{ROOT}/v2/nothing"), 404)
    # A known endpoint with the wrong method: 405, in JSON, with Allow.
    wrong = httpx.delete(url)
    error_of(wrong, 405, code="method_not_allowed")
    expect(wrong.headers.get("allow") == "POST", f"Allow {wrong.headers}")
    expect(httpx.post(f"{ROOT}/health").headers.get("allow") == "GET", "POST /health")
    # Seeds are signed 64-bit integers, as OpenAI's: each its own sequence, the same twice.
    signed = lambda s: post(json.dumps({**ok, "temperature": 1.0, "max_tokens": 12, "seed": s}).encode()).json()["choices"][0]["text"]
    expect(signed(-5) == signed(-5), "seed -5 twice")
    expect(signed(-5) != signed(5) or signed(-6) != signed(6), "negative seeds are their own")
    error_of(post(json.dumps({**ok, "seed": 1.5}).encode()), 400, "seed")
    # Chat content as parts: text parts are read, any other kind is refused by its path.
    chat_url = f"{BASE}/chat/completions"
    parts = lambda *p: {"model": MODEL, "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": list(p)}]}
    joined = httpx.post(chat_url, json=parts({"type": "text", "text": "the cat"}, {"type": "text", "text": "sat"})).json()
    plain = httpx.post(chat_url, json={**parts(), "messages": [{"role": "user", "content": "the cat\nsat"}]}).json()
    expect(joined["choices"][0]["message"] == plain["choices"][0]["message"], f"text parts {joined} vs {plain}")
    error_of(httpx.post(chat_url, json=parts({"type": "image_url", "image_url": {"url": "x"}})), 400, "messages[0].content")
    error_of(httpx.post(chat_url, json={**parts(), "messages": [{"role": "user"}]}), 400, "messages[0].content")
    # `null` is "not set" for every optional field, as clients send it.
    nulls = {k: None for k in ["stream", "echo", "logprobs", "stop", "n", "temperature", "top_p", "seed",
                               "frequency_penalty", "presence_penalty", "logit_bias", "best_of", "suffix", "stream_options"]}
    expect(post(json.dumps({**ok, **nulls}).encode()).status_code == 200, "optional fields sent as null")
    chat_nulls = {"logprobs": None, "top_logprobs": None, "tools": None, "response_format": None, "stream": None}
    expect(httpx.post(chat_url, json={**parts(), "messages": [{"role": "user", "content": "x"}], **chat_nulls}).status_code == 200, "chat nulls")
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


def check_logprobs():
    import math

    probe = open(os.environ["PROBE_TEXT"], encoding="utf-8").read()
    want = float(os.environ["PROBE_NATS"])
    # Echo with nothing generated scores the prompt: the same nats/token as the evaluate stage.
    r = client.completions.create(model=MODEL, prompt=probe, max_tokens=0, echo=True, logprobs=0)
    c, lp = r.choices[0], r.choices[0].logprobs
    expect(c.text == probe and "".join(lp.tokens) == probe, f"echo: {c.text!r} / {lp.tokens}")
    expect(r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(lp.tokens), f"echo usage {r.usage}")
    expect(lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, "the first token has no context")
    expect(all(probe[o:].startswith(t) for o, t in zip(lp.text_offset, lp.tokens)), f"offsets {lp.text_offset}")
    nats = -sum(lp.token_logprobs[1:]) / (len(lp.tokens) - 1)
    expect(abs(nats - want) <= 1e-4 * max(1.0, want), f"echo scores {nats} nats/token, the evaluate stage {want}")
    # The same prompt as token ids (PROBE_IDS, from the tokenizer): the same tokens and numbers.
    ids = json.loads(os.environ["PROBE_IDS"])
    for shape in (ids, [ids]):
        r2 = client.completions.create(model=MODEL, prompt=shape, max_tokens=0, echo=True, logprobs=0)
        l2 = r2.choices[0].logprobs
        expect((r2.choices[0].text, l2.tokens, l2.token_logprobs, l2.text_offset) == (c.text, lp.tokens, lp.token_logprobs, lp.text_offset), f"ids prompt: {r2}")
    error_of(httpx.post(f"{BASE}/completions", json={"model": MODEL, "prompt": [ids[0], 10**6], "max_tokens": 1}), 400, "prompt")
    # A batch of prompts, as harnesses send it: choice i answers prompt i, as it would alone.
    b = client.completions.create(model=MODEL, prompt=[ids, ids[:10]], max_tokens=0, echo=True, logprobs=0)
    expect([c.index for c in b.choices] == [0, 1], f"batch choices {b.choices}")
    expect(b.choices[0].logprobs.token_logprobs == lp.token_logprobs and b.choices[0].text == c.text, "batch prompt 0")
    expect(b.choices[1].logprobs.token_logprobs == lp.token_logprobs[:10], f"batch prompt 1: {b.choices[1].logprobs}")
    expect(b.usage.prompt_tokens == len(ids) + 10, f"batch usage {b.usage}")
    texts = ["the cat", "once upon"]
    alone = [client.completions.create(model=MODEL, prompt=t, max_tokens=6, temperature=0).choices[0].text for t in texts]
    both = client.completions.create(model=MODEL, prompt=texts, max_tokens=6, temperature=0, n=2)
    expect([ch.text for ch in both.choices] == [alone[0], alone[0], alone[1], alone[1]], f"batch × n: {both.choices} vs {alone}")
    error_of(httpx.post(f"{BASE}/completions", json={"model": MODEL, "prompt": ["a", 1], "max_tokens": 1}), 400, "prompt")
    error_of(httpx.post(f"{BASE}/completions", json={"model": MODEL, "prompt": ["a"] * 9, "n": 8, "max_tokens": 1}), 400, "prompt")

    # Greedy generation: each token is the most likely one, and the listed ones are probabilities.
    kw = dict(model=MODEL, prompt="the cat", max_tokens=12, temperature=0, logprobs=5)
    g = client.completions.create(**kw)
    text, lp = g.choices[0].text, g.choices[0].logprobs
    expect(len(lp.tokens) == g.usage.completion_tokens, f"{len(lp.tokens)} tokens for {g.usage}")
    expect("".join(lp.tokens) == text, f"tokens {lp.tokens} vs text {text!r}")
    expect(all(text[o:].startswith(t) for o, t in zip(lp.text_offset, lp.tokens)), f"offsets {lp.text_offset}")
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        expect(chosen <= 0 and 1 <= len(top) <= 6 and chosen == max(top.values()), f"{chosen} among {top}")
        expect(sum(math.exp(v) for v in top.values()) <= 1 + 1e-5, f"more than all probability: {top}")
    # Streamed: the same tokens and numbers, spread over the chunks.
    tokens, values = [], []
    for chunk in client.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            if ch.logprobs is not None:
                tokens += ch.logprobs.tokens
                values += ch.logprobs.token_logprobs
    expect((tokens, values) == (lp.tokens, lp.token_logprobs), f"streamed {tokens} {values}")
    # A stop string cuts the text, and the tokens listed are those that start in what is
    # returned (the ones inside the stop string are not), streamed or not.
    if len(lp.tokens) >= 4:
        stop = text[lp.text_offset[2]:lp.text_offset[2] + 2]
        cut = text.find(stop)
        keep = sum(1 for o in lp.text_offset if o < cut)
        s = client.completions.create(stop=[stop], **kw)
        sl = s.choices[0].logprobs
        expect(s.choices[0].text == text[:cut] and s.choices[0].finish_reason == "stop", f"stop {stop!r}: {s.choices[0]}")
        expect((sl.tokens, sl.token_logprobs) == (lp.tokens[:keep], lp.token_logprobs[:keep]), f"stop {stop!r}: {sl.tokens}")
        streamed = []
        for chunk in client.completions.create(stream=True, stop=[stop], **kw):
            for ch in chunk.choices:
                streamed += ch.logprobs.tokens if ch.logprobs is not None else []
        expect(streamed == sl.tokens, f"streamed with stop {stop!r}: {streamed}")
    # Echo in front of generation changes nothing about the generated part.
    e = client.completions.create(echo=True, **kw)
    el = e.choices[0].logprobs
    expect(e.choices[0].text == "the cat" + text, f"echo + generation {e.choices[0].text!r}")
    expect(el.token_logprobs[-len(lp.tokens):] == lp.token_logprobs, "generated log-probabilities after echo")

    # Chat: per token its bytes and the top 3, most likely first.
    msgs = [{"role": "user", "content": "once upon a time"}]
    ch = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    content = ch.choices[0].logprobs.content
    expect(len(content) == ch.usage.completion_tokens, f"{len(content)} entries for {ch.usage}")
    expect("".join(t.token for t in content) == ch.choices[0].message.content, "chat tokens and text")
    for t in content:
        values = [x.logprob for x in t.top_logprobs]
        expect(len(values) == 3 and values == sorted(values, reverse=True) and t.logprob == values[0], f"{t}")
        expect(t.bytes == list(t.token.encode()), f"bytes of {t}")
    plain = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    expect(plain.choices[0].logprobs is None, "logprobs only when asked")

    # What the server does not do is refused, never silently ignored; neutral values pass.
    url = f"{BASE}/completions"
    ok = {"model": MODEL, "prompt": "the cat", "max_tokens": 4}
    for extra, param in [({"logprobs": 21}, "logprobs"), ({"max_tokens": 0}, "max_tokens"),
                         ({"frequency_penalty": 2.5}, "frequency_penalty"), ({"presence_penalty": -3}, "presence_penalty"),
                         ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
                         ({"logit_bias": {"5": "up"}}, "logit_bias"), ({"logit_bias": {str(10**6): 1}}, "logit_bias"),
                         ({"best_of": 0}, "best_of"), ({"suffix": "end"}, "suffix")]:
        error_of(httpx.post(url, json={**ok, **extra}), 400, param)
    chat_ok = {"model": MODEL, "messages": msgs, "max_tokens": 4}
    for extra, param in [({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
                         ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                         ({"response_format": {"type": "json_object"}}, "response_format")]:
        error_of(httpx.post(f"{BASE}/chat/completions", json={**chat_ok, **extra}), 400, param)
    neutral = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "best_of": 1, "echo": False}
    expect(httpx.post(url, json={**ok, **neutral}).status_code == 200, "neutral values of unsupported options")
    check_shaping(ids)
    check_best_of()
    print(f"logprobs ok: {nats:.6f} nats/token by echo, {want:.6f} by the evaluate stage")


def check_best_of():
    """best_of draws seed, seed + 1, … as n does, and answers with the n of highest mean log-probability."""
    kw = dict(model=MODEL, prompt="the cat", max_tokens=8, temperature=1.0, seed=11)
    drawn = client.completions.create(n=4, logprobs=0, **kw)
    mean = lambda c: sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs)
    ranked = sorted(drawn.choices, key=lambda c: (-mean(c), c.index))
    picked = client.completions.create(n=2, best_of=4, **kw)
    expect([c.text for c in picked.choices] == [c.text for c in ranked[:2]], f"best_of 4: {picked.choices} from {ranked}")
    expect([c.index for c in picked.choices] == [0, 1] and all(c.logprobs is None for c in picked.choices), f"{picked.choices}")
    expect(picked.usage.completion_tokens == drawn.usage.completion_tokens, f"usage {picked.usage} vs {drawn.usage}")
    expect(picked.usage.prompt_tokens == drawn.usage.prompt_tokens, f"usage {picked.usage} vs {drawn.usage}")
    # Asked for, the log-probabilities come with the chosen draw.
    one = client.completions.create(best_of=4, logprobs=2, **kw).choices[0]
    expect(one.text == ranked[0].text and one.logprobs.token_logprobs == ranked[0].logprobs.token_logprobs, f"{one}")
    url = f"{BASE}/completions"
    for bad in [{"best_of": 1, "n": 2}, {"best_of": 17}, {"best_of": 2, "stream": True}]:
        error_of(httpx.post(url, json={**kw, **bad}), 400, "best_of")
    print(f"best_of ok: {[c.text for c in picked.choices]}")


def check_shaping(ids):
    """logit_bias and the penalties, greedy: each token is the most likely under the shaped logits."""
    # Each id's text, from the echoed prompt of those ids.
    probe = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=0).choices[0]
    probe_tokens = probe.logprobs.tokens
    kw = dict(model=MODEL, prompt="the cat", max_tokens=16, temperature=0, logprobs=20)
    plain = client.completions.create(**kw).choices[0]
    # +100 on one token: it is drawn every time.
    favoured = client.completions.create(logit_bias={str(ids[3]): 100}, **kw).choices[0]
    want = probe_tokens[3]
    expect(favoured.logprobs.tokens == [want] * 16, f"logit_bias +100 on {want!r}: {favoured.logprobs.tokens}")
    # -100 on every token of the probe text: none of them is drawn.
    banned = {str(i): -100 for i in ids}
    avoided = client.completions.create(logit_bias=banned, **kw).choices[0]
    expect(not set(avoided.logprobs.tokens) & set(probe_tokens), f"banned tokens drawn: {avoided.logprobs.tokens}")
    # Penalties: a token generated c times loses presence + c × frequency (log-probabilities
    # are the model's own, so the test applies the penalties to them as the server must).
    presence, frequency = 1.0, 1.5
    pen = client.completions.create(presence_penalty=presence, frequency_penalty=frequency, **kw).choices[0]
    seen = {}
    for chosen, value, top in zip(pen.logprobs.tokens, pen.logprobs.token_logprobs, pen.logprobs.top_logprobs):
        shaped = lambda t, v: v - (presence + frequency * seen[t] if t in seen else 0.0)
        best = max(shaped(t, v) for t, v in top.items())
        expect(shaped(chosen, value) >= best - 1e-4, f"{chosen!r} ({value}) drawn over {top} after {seen}")
        seen[chosen] = seen.get(chosen, 0) + 1
    expect(pen.text != plain.text, f"penalties changed nothing: {pen.text!r}")
    expect(max(seen.values()) < max(plain.logprobs.tokens.count(t) for t in plain.logprobs.tokens),
           f"penalised {seen} vs plain {plain.logprobs.tokens}")
    print(f"shaping ok: {plain.text!r} → penalised {pen.text!r}")


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


def check_card():
    """/v1/models says when the model was made: within CREATED_SPAN seconds of CREATED_FROM."""
    start = os.environ["CREATED_FROM"]
    start = int(start) if start.isdigit() else datetime.fromisoformat(start.replace("Z", "+00:00")).timestamp()
    span = float(os.environ.get("CREATED_SPAN", "0"))
    card, listed = client.models.retrieve(MODEL), client.models.list().data[0]
    expect(start <= card.created <= start + span + 1, f"created {card.created}, expected {start} + {span} s")
    expect(listed.created == card.created, f"listed {listed.created} vs retrieved {card.created}")
    print(f"card ok: created {card.created}")


{"api": check_api, "errors": check_errors, "card": check_card, "logprobs": check_logprobs, "concurrent": check_concurrent, "overload": check_overload, "graceful": check_graceful}[CHECK]()
