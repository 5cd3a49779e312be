"""Load test of `orchestrate serve` (f32 and INT8) beside the original study's FastAPI server,
with wrk (Debian) at concurrency 1, 8 and 32, on one machine.

    python3 tests/bench/serve_load.py --orchestrate target/release/orchestrate \
        --model F32_CKPT_DIR --int8 INT8.gguf --tokenizer tokenizer.json \
        [--peer-dir ORIGINAL_REPO --peer-python VENV/bin/python] [--seconds 10]

Our request: POST /v1/completions {"prompt": "Once upon a time", "max_tokens": 32,
"temperature": 0}: every request generates the same tokens (greedy), counted from `usage`.
The original's request: POST /infer {"input_text": "Once upon a time", "max_length": 32}.
Prints one JSON line per (server, concurrency) and a markdown table. wrk runs one thread on
the same 2-core machine as the server it loads.
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url, proc, timeout=60):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            sys.exit(f"the server exited: {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except Exception:
            time.sleep(0.2)
    sys.exit(f"{url} did not come up")


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=30).read())


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def to_ms(v):
    n, unit = re.match(r"([\d.]+)(us|ms|s)", v).groups()
    return float(n) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def wrk(url, body, conns, seconds):
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(json.dumps(body))}\nwrk.headers["Content-Type"] = "application/json"\n')
        script = f.name
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", script, url],
                         capture_output=True, text=True, check=True).stdout
    os.unlink(script)
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50_ms": to_ms(lat["50"]),
            "p99_ms": to_ms(lat["99"]), "requests": total, "non_2xx": int(non2xx.group(1)) if non2xx else 0,
            "seconds": seconds}


def run_ours(binary, model, tokenizer, label, seconds, rows):
    port = free_port()
    proc = subprocess.Popen([binary, "serve", "--model", model, "--tokenizer", tokenizer, "--port", str(port), "--name", "m"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_up(f"{base}/health", proc)
        body = {"model": "m", "prompt": "Once upon a time", "max_tokens": 32, "temperature": 0}
        tokens = post(f"{base}/v1/completions", body)["usage"]["completion_tokens"]
        for c in (1, 8, 32):
            r = wrk(f"{base}/v1/completions", body, c, seconds)
            ok = r["requests"] - r["non_2xx"]
            r.update(server=f"orchestrate serve ({label})", conns=c, tokens_per_request=tokens,
                     generated_tok_s=tokens * ok / seconds, peak_rss_mb=peak_rss_mb(proc.pid))
            print(json.dumps(r), flush=True)
            rows.append(r)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def run_peer(peer_dir, python, seconds, rows):
    port = free_port()
    proc = subprocess.Popen([python, "inference_api.py", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=os.path.join(peer_dir, "deployment"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_up(f"{base}/health", proc)
        body = {"input_text": "Once upon a time", "max_length": 32}
        first = post(f"{base}/infer", body)
        for c in (1, 8, 32):
            r = wrk(f"{base}/infer", body, c, seconds)
            r.update(server="original FastAPI /infer", conns=c, tokens_per_request=first["tokens_generated"],
                     generated_tok_s=None, peak_rss_mb=peak_rss_mb(proc.pid), answer=first["output_text"])
            print(json.dumps(r), flush=True)
            rows.append(r)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--orchestrate", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--int8", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--peer-dir")
    ap.add_argument("--peer-python")
    ap.add_argument("--seconds", type=int, default=10)
    a = ap.parse_args()
    rows = []
    run_ours(a.orchestrate, a.model, a.tokenizer, "f32", a.seconds, rows)
    run_ours(a.orchestrate, a.int8, a.tokenizer, "INT8", a.seconds, rows)
    if a.peer_dir:
        run_peer(a.peer_dir, a.peer_python, a.seconds, rows)
    print("\n| server | conc. | req/s | p50 | p99 | generated tok/s | non-2xx | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        tok = f"{r['generated_tok_s']:,.0f}" if r["generated_tok_s"] is not None else "none generated"
        print(f"| {r['server']} | {r['conns']} | {r['rps']:,.1f} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms | {tok} | "
              f"{r['non_2xx']} of {r['requests']} | {r['peak_rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
