#!/usr/bin/env python3
"""Submission + completion overhead of trivial stages on a real Slurm cluster, side by side.

On one cluster (`.ci/slurm start`, a one-node cluster on localhost), interleaved round by
round, each from a fresh folder and an empty queue:

  orch   `orchestrate run P --executor slurm` (default poll: 1 s, growing to 10 s)
  smk    Snakemake with snakemake-executor-plugin-slurm, tuned as a user would for short jobs:
         `--slurm-status-command squeue`, status checks from 1 s after submission, every 1 s
  hand   the floor: the same jobs by hand — plain `sbatch` then `squeue` every 1 s until the
         queue is empty (fan-out), or `sbatch --dependency=afterok:<previous>` (chain)

for a 50-stage fan-out and a 20-stage chain of `echo` commands. Every Slurm command any of them
calls goes through a wrapper that logs it, so status queries (squeue, sacct) are counted.

    python3 tests/bench/slurm_overhead.py --orchestrate target/release/orchestrate \
        --snakemake /path/to/venv/bin/snakemake --rounds 3 --work /tmp/slurm-bench
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SLURM_PROGRAMS = ["sbatch", "squeue", "sacct", "scancel", "sinfo", "scontrol"]


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def make_wrappers(bin_dir: Path):
    bin_dir.mkdir(parents=True, exist_ok=True)
    for prog in SLURM_PROGRAMS:
        real = shutil.which(prog)
        if not real:
            continue
        w = bin_dir / prog
        w.write_text(f'#!/bin/sh\necho "{prog} $(date +%s.%N)" >> "$SLURM_CALL_LOG"\nexec {real} "$@"\n')
        w.chmod(0o755)


def calls(log: Path):
    counts = {}
    if log.exists():
        for line in log.read_text().splitlines():
            prog = line.split()[0]
            counts[prog] = counts.get(prog, 0) + 1
    return counts


def queue_empty(env):
    out = subprocess.run(["squeue", "--noheader", "--format=%i"], env=env, capture_output=True, text=True, check=True)
    return not out.stdout.strip()


def wait_queue_empty(env):
    t0 = time.time()
    while not queue_empty(env):
        if time.time() - t0 > 120:
            sys.exit("the queue did not drain")
        time.sleep(0.5)


# --- the three tools ---------------------------------------------------------------------

def orch_files(d: Path, shape: str, n: int):
    if shape == "fan":
        items = ", ".join(str(i) for i in range(n))
        y = (f"name: fan\nstages:\n  work:\n    kind: command\n    foreach: [{items}]\n"
             f"    cmd: \"echo ${{item}} > ${{outputs.out}}\"\n    outputs: [out]\n")
    else:
        y = "name: chain\nstages:\n"
        for i in range(n):
            if i == 0:
                y += f"  s{i}:\n    kind: command\n    cmd: \"echo 0 > ${{outputs.out}}\"\n    outputs: [out]\n"
            else:
                y += (f"  s{i}:\n    kind: command\n    inputs: {{prev: s{i - 1}.out}}\n"
                      f"    cmd: \"cat ${{inputs.prev}} > ${{outputs.out}}; echo {i} >> ${{outputs.out}}\"\n"
                      f"    outputs: [out]\n")
    (d / "p.yaml").write_text(y)


def run_orch(d: Path, shape: str, n: int, env, args):
    orch_files(d, shape, n)
    subprocess.run([args.orchestrate, "run", "p.yaml", "--executor", "slurm"], cwd=d, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = d / "artifacts" / "outputs"
    assert store.exists(), "orchestrate delivered no outputs"


def smk_files(d: Path, shape: str, n: int):
    if shape == "fan":
        s = (f"rule all:\n    input: expand('out/{{i}}.txt', i=range({n}))\n"
             "rule work:\n    output: 'out/{i}.txt'\n    shell: 'echo {wildcards.i} > {output}'\n")
    else:
        s = (f"wildcard_constraints:\n    i=r'\\d+'\n"
             f"rule all:\n    input: 'out/{n - 1}.txt'\n"
             "def prev(w):\n    i = int(w.i)\n    return [] if i == 0 else [f'out/{i - 1}.txt']\n"
             "rule step:\n    input: prev\n    output: 'out/{i}.txt'\n"
             "    shell: 'cat {input} /dev/null > {output}; echo {wildcards.i} >> {output}'\n")
    (d / "Snakefile").write_text(s)


def run_smk(d: Path, shape: str, n: int, env, args):
    smk_files(d, shape, n)
    cmd = [args.snakemake, "--executor", "slurm", "--jobs", "100", "--cores", "2",
           "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1",
           "--seconds-between-status-checks", "1", "--max-status-checks-per-second", "1",
           "--latency-wait", "5", "--default-resources", "slurm_partition=debug", "mem_mb=1000", "runtime=10",
           "--quiet", "all"]
    r = subprocess.run(cmd, cwd=d, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"snakemake failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    last = d / "out" / (f"{n - 1}.txt")
    assert last.exists(), "snakemake wrote no outputs"


def run_hand(d: Path, shape: str, n: int, env, args):
    out = d / "out"
    out.mkdir()
    ids = []
    for i in range(n):
        if shape == "fan":
            wrap = f"echo {i} > {out}/{i}.txt"
            dep = []
        else:
            wrap = f"cat {out}/{i - 1}.txt /dev/null > {out}/{i}.txt 2>/dev/null; echo {i} >> {out}/{i}.txt"
            dep = [f"--dependency=afterok:{ids[-1]}"] if ids else []
        r = subprocess.run(["sbatch", "--parsable", "--output=/dev/null", "--cpus-per-task=1", *dep, "--wrap", wrap],
                           env=env, capture_output=True, text=True, check=True)
        ids.append(r.stdout.strip().split(";")[0])
    jobs = ",".join(ids)
    while True:
        time.sleep(1.0)
        r = subprocess.run(["squeue", "--noheader", "--format=%i", "--jobs", jobs], env=env, capture_output=True,
                           text=True)
        if r.returncode == 0 and not r.stdout.strip():
            break
    assert (out / f"{n - 1}.txt").exists(), "hand-submitted jobs wrote no outputs"


TOOLS = {"orch": run_orch, "smk": run_smk, "hand": run_hand}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--orchestrate", required=True)
    ap.add_argument("--snakemake", required=True)
    ap.add_argument("--work", default="/tmp/slurm-bench")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fan", type=int, default=50)
    ap.add_argument("--chain", type=int, default=20)
    ap.add_argument("--tools", default="orch,smk,hand")
    args = ap.parse_args()
    args.orchestrate = str(Path(args.orchestrate).resolve())
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cluster = work / "cluster"
    subprocess.run(["bash", str(REPO / ".ci/slurm"), "start", str(cluster)], check=True, stdout=subprocess.DEVNULL)
    # Snakemake's job-step executor strips SLURM_* variables (SLURM_CONF among them) before its
    # nested `srun`, which then looks for the cluster's config where a real cluster keeps it.
    system_conf = Path("/etc/slurm/slurm.conf")
    linked = False
    if not system_conf.exists():
        system_conf.parent.mkdir(parents=True, exist_ok=True)
        system_conf.symlink_to(cluster / "slurm.conf")
        linked = True
    try:
        make_wrappers(work / "bin")
        env = dict(os.environ)
        env["SLURM_CONF"] = str(cluster / "slurm.conf")
        env["PATH"] = f"{work / 'bin'}:{Path(args.snakemake).parent}:{env['PATH']}"
        tools = args.tools.split(",")
        results = []
        for rnd in range(args.rounds):
            order = tools[rnd % len(tools):] + tools[:rnd % len(tools)]
            for shape, n in (("fan", args.fan), ("chain", args.chain)):
                for tool in order:
                    d = work / f"r{rnd}-{shape}-{tool}"
                    d.mkdir()
                    log = d / "slurm-calls.log"
                    env["SLURM_CALL_LOG"] = str(log)
                    wait_queue_empty(env)
                    t0 = time.perf_counter()
                    TOOLS[tool](d, shape, n, env, args)
                    wall = time.perf_counter() - t0
                    c = calls(log)
                    row = {"round": rnd, "shape": shape, "stages": n, "tool": tool, "wall_s": wall,
                           "sbatch": c.get("sbatch", 0), "status_queries": c.get("squeue", 0) + c.get("sacct", 0)}
                    results.append(row)
                    print(json.dumps(row), flush=True)
        summarize(results, tools)
    finally:
        subprocess.run(["bash", str(REPO / ".ci/slurm"), "stop", str(cluster)], stdout=subprocess.DEVNULL)
        if linked:
            system_conf.unlink()


def summarize(results, tools):
    print(f"\nCPU: {cpu_model()}, {os.cpu_count()} cores; one-node cluster (.ci/slurm), "
          f"{len({r['round'] for r in results})} interleaved rounds, medians")
    print("| shape | tool | wall s | per stage s | status queries | queries/s |")
    print("|---|---|---|---|---|---|")
    med = {}
    for shape in ("fan", "chain"):
        for tool in tools:
            rows = [r for r in results if r["shape"] == shape and r["tool"] == tool]
            if not rows:
                continue
            wall = statistics.median(r["wall_s"] for r in rows)
            q = statistics.median(r["status_queries"] for r in rows)
            med[(shape, tool)] = wall
            print(f"| {shape} {rows[0]['stages']} | {tool} | {wall:.2f} | {wall / rows[0]['stages']:.3f} | "
                  f"{q:.0f} | {q / wall:.2f} |")
    for shape in ("fan", "chain"):
        if (shape, "orch") in med and (shape, "smk") in med:
            print(f"{shape}: Snakemake / orchestrate wall = {med[(shape, 'smk')] / med[(shape, 'orch')]:.2f}x")
        if (shape, "orch") in med and (shape, "hand") in med:
            print(f"{shape}: orchestrate / hand-submitted floor = {med[(shape, 'orch')] / med[(shape, 'hand')]:.2f}x")


if __name__ == "__main__":
    main()
