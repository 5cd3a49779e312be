#!/usr/bin/env python3
"""The models beside the PyTorch original, interleaved round by round (issue 18's campaign).

Each round, on one thread (--threads) and in this order:

  ours      `--example throughput`: training, forward and generation tok/s of Itera-Lite tiny
            and Transformer tiny, and each training step ÷ its own weight-GEMM floor
  original  `torch_ref_bench.py` (../shared/peer/) on the original's `models/` package
            (CisnerosCodes/Itera-Lite: `git archive HEAD models utils | tar -x -C DIR`)
  qbench    `--example qbench`: INT8 / INT4 ÷ f32 on the best kernel path of this CPU, and with
            --avx2 on the AVX2 path (a `--no-default-features` build run with ITERA_SIMD=avx2,
            what an AVX2-only CPU runs)

then prints a markdown table per campaign (ours / the original's tok/s and the ratio, so each
ratio comes from one round), the medians, and each target of issue 18 against these figures.
No peer figure is stored anywhere: every ratio printed is against the original of that round.
Run it on an otherwise idle machine; each round prints the load it started at.

    python3 tests/bench/model_peer.py --peer-python /path/to/torch-venv/bin/python \\
        --peer-dir DIR --rounds 4 --avx2 [--json figures.jsonl]

It builds what it runs first (`cargo build --release -p itera-models --example throughput
--example qbench`, and the AVX2 build in target/avx2).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOKENS = 16 * 128  # one training step of both benches: batch 16 × seq 128
PEER_MODELS = {"itera_tiny": "itera_lite", "transformer_tiny": "transformer"}


def build(avx2: bool) -> tuple[Path, Path, Path | None]:
    cargo = ["cargo", "build", "--release", "-p", "itera-models", "--example", "throughput", "--example", "qbench"]
    subprocess.run(cargo, cwd=REPO, check=True)
    examples = REPO / "target/release/examples"
    avx2_qbench = None
    if avx2:
        target = REPO / "target/avx2"
        cmd = ["cargo", "build", "--release", "-p", "itera-models", "--no-default-features", "--example", "qbench"]
        subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "CARGO_TARGET_DIR": str(target)})
        avx2_qbench = target / "release/examples/qbench"
    return examples / "throughput", examples / "qbench", avx2_qbench


def ours(binary: Path, threads: int, env: dict) -> list[dict]:
    """Run one of our benches with BENCH_JSON; its JSON lines."""
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as out:
        run_env = {**os.environ, **env, "BENCH_THREADS": str(threads), "RAYON_NUM_THREADS": str(threads)}
        run_env["BENCH_JSON"] = out.name
        subprocess.run([str(binary)], check=True, env=run_env, stdout=subprocess.DEVNULL)
        return [json.loads(line) for line in Path(out.name).read_text().splitlines() if line.strip()]


def original(a: argparse.Namespace) -> tuple[dict, str]:
    """The original's training and forward tok/s by (our model name, kind), and torch's version."""
    cmd = [a.peer_python, a.peer_script, "--peer-dir", a.peer_dir, "--threads", str(a.threads),
           "--configs", *PEER_MODELS, "--omp-wait-policy", "passive",
           "--measure", "params", "train", "forward", "--repeats", "3"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    figures, torch = {}, "?"
    for rec in (json.loads(line) for line in out.splitlines() if line.startswith("{")):
        torch = rec.get("torch", torch)
        if rec.get("metric") in ("train_tokens_per_s", "forward_tokens_per_s") and rec.get("model") in PEER_MODELS:
            figures[(PEER_MODELS[rec["model"]], rec["metric"].split("_")[0])] = rec["value"]
    wanted = [(m, k) for m in PEER_MODELS.values() for k in ("train", "forward")]
    if missing := [k for k in wanted if k not in figures]:
        sys.exit(f"the original printed no figure for {missing}:\n{out}")
    return figures, torch


def settle(limit_s: float = 120.0, below: float = 0.5) -> None:
    """Wait (up to `limit_s`) for the 1-minute load to fall below `below`: the build just
    finished, and its load would slow the first round of both sides."""
    start = time.monotonic()
    while os.getloadavg()[0] >= below and time.monotonic() - start < limit_s:
        time.sleep(5)


def cpu() -> str:
    info = Path("/proc/cpuinfo").read_text()
    field = lambda name: next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith(name)), "?")
    flags = set(field("flags").split())
    simd = " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f in flags)
    return f"{field('model name')}, family {field('cpu family')} model {field('model')} ({simd}), {os.cpu_count()} vCPUs"


def spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def round_row(n: int, mine: dict, peer: dict) -> tuple[str, dict]:
    """A round's markdown row and its ratios."""
    cells, r = [str(n)], {}
    for model in ("itera_lite", "transformer"):
        for kind in ("train", "forward"):
            o, p = mine[model][f"{kind}_tok_s"], peer[(model, kind)]
            r[(model, kind)] = o / p
            cells.append(f"{o:,.0f} / {p:,.0f} = {o / p:.2f}×")
        r[(model, "floor")] = mine[model]["step_over_floor"]
        cells.append(f"{r[(model, 'floor')]:.3f}")
    t = mine["transformer"]
    r["allowed_ms"] = TOKENS / (2.5 * peer[("transformer", "train")]) * 1e3
    r["products_ms"] = t["floor_with_attention_ms"]
    r["step_ms"] = TOKENS / t["train_tok_s"] * 1e3
    cells += [f"{r['step_ms']:.1f}", f"{r['allowed_ms']:.1f}", f"{t['floor_ms']:.1f} / {r['products_ms']:.1f}"]
    return "| " + " | ".join(cells) + " |", r


def judge(rounds: list[dict], quant: dict) -> list[str]:
    n = len(rounds)
    col = lambda key: [r[key] for r in rounds]
    count = lambda key, ok: sum(1 for v in col(key) if ok(v))
    lines = [
        f"- Itera-Lite step ≤ 1.25× its weight-GEMM floor: median {statistics.median(col(('itera_lite', 'floor'))):.3f}, "
        f"{count(('itera_lite', 'floor'), lambda v: v <= 1.25)} of {n} rounds",
        f"- Transformer forward ≥ 1.5× the original: {spread(col(('transformer', 'forward')))}×, "
        f"{count(('transformer', 'forward'), lambda v: v >= 1.5)} of {n} rounds",
        f"- Transformer training ≥ 2.5× the original: {spread(col(('transformer', 'train')))}×, "
        f"{count(('transformer', 'train'), lambda v: v >= 2.5)} of {n} rounds. 2.5× allows a step of "
        f"{min(col('allowed_ms')):.1f}–{max(col('allowed_ms')):.1f} ms; the weight GEMMs and attention's products "
        f"alone take {min(col('products_ms')):.1f}–{max(col('products_ms')):.1f} ms, leaving "
        + ", ".join(f"{r['allowed_ms'] - r['products_ms']:.1f}" for r in rounds)
        + " ms per round for the rest of the step, which takes "
        + ", ".join(f"{r['step_ms'] - r['products_ms']:.1f}" for r in rounds) + " ms",
    ]
    verdict = lambda ok: "met in every run" if ok else "NOT met in every run"
    for path, models in quant.items():
        vnni = "vnni" in path
        want = "INT8 ≥ 1.3× f32 forward and ≥ 1.5× generation" if vnni else "INT8 ≥ f32 forward"
        for model, x in models.items():
            int8f, int8g = x[("int8", "forward")], x[("int8", "generate")]
            int4f, int4g = x[("int4", "forward")], x[("int4", "generate")]
            met8 = min(int8f) >= 1.3 and min(int8g) >= 1.5 if vnni else min(int8f) >= 1.0
            met4 = min(int4f) >= 1.0 and min(int4g) >= 1.0
            lines.append(
                f"- {model}, kernels `{path}`: {want}: {verdict(met8)} (forward {spread(int8f)}×, generation "
                f"{spread(int8g)}×); INT4 ≥ f32: {verdict(met4)} (forward {spread(int4f)}×, generation {spread(int4g)}×)"
            )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer-python", required=True, help="a Python with torch (the original's dependencies)")
    ap.add_argument("--peer-dir", required=True, help="a folder holding the original's models/ and utils/")
    ap.add_argument("--peer-script", default=str(REPO.parent / "shared/peer/torch_ref_bench.py"))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--avx2", action="store_true", help="also run qbench on the forced AVX2 path")
    ap.add_argument("--json", help="append every figure, one JSON line each, to this file")
    a = ap.parse_args()
    throughput, qbench, avx2_qbench = build(a.avx2)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    print(f"CPU: {cpu()}; {a.threads} thread(s); commit {commit.stdout.strip() or '?'}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    settle()
    rows, ratios, records = [], [], []
    quant: dict = {}
    for n in range(1, a.rounds + 1):
        load = os.getloadavg()[0]
        mine = {r["model"]: r for r in ours(throughput, a.threads, {})}
        peer, torch = original(a)
        qruns = [ours(qbench, a.threads, {})]
        if avx2_qbench:
            qruns.append(ours(avx2_qbench, a.threads, {"ITERA_SIMD": "avx2"}))
        for q in qruns:
            for rec in (r for r in q if r["weights"] != "f32"):
                x = quant.setdefault(rec["kernels"], {}).setdefault(rec["model"], {})
                x.setdefault((rec["weights"], "forward"), []).append(rec["forward_x_f32"])
                x.setdefault((rec["weights"], "generate"), []).append(rec["generate_x_f32"])
        row, r = round_row(n, mine, peer)
        rows.append(row)
        ratios.append(r)
        print(f"round {n} done (load {load:.2f} at its start): {row}", flush=True)
        peer_json = {f"{m}_{k}_tok_s": v for (m, k), v in peer.items()}
        records += [*mine.values(), {"bench": "original", "round": n, "torch": torch, **peer_json}]
        records += [rec for q in qruns for rec in q]
    print()
    print("| round | Itera-Lite training | Itera-Lite forward | Itera-Lite step ÷ floor | Transformer training "
          "| Transformer forward | Transformer step ÷ floor | our step, ms | step for 2.5×, ms "
          "| weight GEMMs / + attention's products, ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    for line in judge(ratios, quant):
        print(line)
    if a.json:
        with open(a.json, "a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
