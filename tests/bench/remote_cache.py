#!/usr/bin/env python3
"""Push and pull through an S3-compatible server: orchestrate vs DVC (dvc-s3), side by side.

Starts moto_server (from the project venv) on a free loopback port and times, interleaved per
round, for two result sets — a phase4 store's results and one large random file:
  push (cold: empty remote prefix), push again (nothing to transfer),
  pull into an empty store / DVC cache (cold), pull again (nothing to transfer).
Each round uses fresh remote prefixes. Prints medians and the DVC / orchestrate ratio.

  python3 tests/bench/remote_cache.py --orchestrate target/release/orchestrate \
      --dvc /path/to/venv/bin/dvc --phase4-store artifacts --work /tmp/rb --rounds 3 --big-mib 1024
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(port):
    moto = REPO / ".venv/bin/moto_server"
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    sys.exit("moto_server did not start")


def sh(cmd, cwd=None, env=None):
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return dt, r


def dvc_repo(dvc, path, payload, env):
    """A DVC repo (no git) tracking `payload` (a file or folder copied into it)."""
    path.mkdir(parents=True)
    sh([dvc, "init", "--no-scm", "-q"], cwd=path, env=env)
    sh([dvc, "config", "core.analytics", "false"], cwd=path, env=env)
    target = path / payload.name
    if payload.is_dir():
        shutil.copytree(payload, target)
    else:
        shutil.copy(payload, target)
    sh([dvc, "add", "-q", payload.name], cwd=path, env=env)
    return payload.name


def dvc_clone(src, dst):
    """The repo without its cache and workspace data: what a teammate checks out."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("cache", "tmp"))
    for p in dst.iterdir():
        if p.name not in (".dvc", ".dvcignore") and not p.name.endswith(".dvc"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def set_dvc_remote(dvc, repo, url, endpoint, env):
    sh([dvc, "remote", "add", "-f", "-d", "s3", url], cwd=repo, env=env)
    sh([dvc, "remote", "modify", "s3", "endpointurl", endpoint], cwd=repo, env=env)


def bench_case(name, orch, dvc, store, pipeline, dvc_src, rounds, work, endpoint, env):
    times = {k: [] for k in ["orch push", "orch push again", "orch pull", "orch pull again",
                             "dvc push", "dvc push again", "dvc pull", "dvc pull again"]}
    for r in range(rounds):
        remote = f"s3://bench/{name}-orch-{r}"
        fresh = work / f"{name}-pull-store-{r}"

        def orch_push():
            args = [orch, "push"] + ([pipeline] if pipeline else []) + ["--store", store, "--remote", remote]
            times["orch push"].append(sh(args, env=env)[0])
            dt, out = sh(args, env=env)
            assert "0 uploaded" in out.stderr, out.stderr
            times["orch push again"].append(dt)

        def orch_pull():
            args = [orch, "pull", "--store", fresh, "--remote", remote]
            times["orch pull"].append(sh(args, env=env)[0])
            dt, out = sh(args, env=env)
            assert "0 results downloaded" in out.stderr, out.stderr
            times["orch pull again"].append(dt)

        def dvc_push():
            set_dvc_remote(dvc, dvc_src, f"s3://bench/{name}-dvc-{r}", endpoint, env)
            times["dvc push"].append(sh([dvc, "push", "-q"], cwd=dvc_src, env=env)[0])
            times["dvc push again"].append(sh([dvc, "push", "-q"], cwd=dvc_src, env=env)[0])

        def dvc_pull():
            clone = work / f"{name}-dvc-clone-{r}"
            dvc_clone(dvc_src, clone)
            times["dvc pull"].append(sh([dvc, "pull", "-q"], cwd=clone, env=env)[0])
            times["dvc pull again"].append(sh([dvc, "pull", "-q"], cwd=clone, env=env)[0])

        order = [(orch_push, orch_pull), (dvc_push, dvc_pull)]
        if r % 2:
            order.reverse()
        for push, pull in order:
            push()
        for push, pull in order:
            pull()
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--orchestrate", required=True)
    ap.add_argument("--dvc", required=True)
    ap.add_argument("--phase4-store", required=True, help="a store holding pipelines/phase4.yaml's results")
    ap.add_argument("--work", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--big-mib", type=int, default=1024)
    a = ap.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    orch = str(Path(a.orchestrate).resolve())
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = dict(os.environ, AWS_ENDPOINT_URL=endpoint, AWS_REGION="us-east-1", AWS_ALLOW_HTTP="true",
               AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", DVC_NO_ANALYTICS="1")
    moto = start_moto(port)
    try:
        sh(["curl", "-sf", "-X", "PUT", f"{endpoint}/bench"])
        results = {}
        # phase4: the same files for both tools (DVC gets every output, exported from the store).
        p4 = str(REPO / "pipelines/phase4.yaml")
        exported = work / "phase4-results"
        sh([orch, "export", p4, "--all", str(exported), "--store", a.phase4_store])
        size = sum(f.stat().st_size for f in exported.rglob("*") if f.is_file())
        nfiles = sum(1 for f in exported.rglob("*") if f.is_file())
        dvc_p4 = work / "dvc-phase4"
        dvc_repo(a.dvc, dvc_p4, exported, env)
        results[f"phase4 results ({nfiles} files, {size / 2**20:.1f} MiB)"] = bench_case(
            "p4", orch, a.dvc, a.phase4_store, p4, dvc_p4, a.rounds, work, endpoint, env)
        # One large random file.
        big = work / "big.bin"
        with open(big, "wb") as f:
            for _ in range(a.big_mib):
                f.write(os.urandom(1 << 20))
        proj = work / "big-project"
        proj.mkdir()
        (proj / "big.yaml").write_text(
            'name: big\nstages:\n  big: {kind: command, cmd: "cp ${inputs.f} ${outputs.o}", '
            f'inputs: {{f: "file:{big}"}}, outputs: [o]}}\n')
        big_store = str(work / "big-store")
        sh([orch, "run", str(proj / "big.yaml"), "--store", big_store])
        dvc_big = work / "dvc-big"
        dvc_repo(a.dvc, dvc_big, big, env)
        results[f"one {a.big_mib} MiB file"] = bench_case(
            "big", orch, a.dvc, big_store, None, dvc_big, a.rounds, work, endpoint, env)
    finally:
        moto.kill()
        moto.wait()
    print(json.dumps(results, indent=1))
    print(f"\n| set | operation | DVC | orchestrate | DVC ÷ orchestrate |\n|---|---|---|---|---|")
    for case, t in results.items():
        for op in ["push", "push again", "pull", "pull again"]:
            d, o = t[f"dvc {op}"], t[f"orch {op}"]
            print(f"| {case} | {op} | {d:.3f} s | {o:.3f} s | {d / o:.1f}× |")


if __name__ == "__main__":
    main()
