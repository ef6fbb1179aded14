#!/usr/bin/env python3
"""Syscalls per request: strace -c -f -p PID over a fixed number of requests.

For each proxy (default holdfast and nginx) and each workload: start the
proxy pinned to CPU 0, warm it up, attach `strace -c -f` to it (nginx: its
worker; holdfast: every thread), send exactly N requests over C keep-alive
connections with `h2load --h1 -n N -c C` pinned to CPU 1, detach, and print
calls per request, in total and for the most frequent syscalls.

strace slows the traced process a lot; the counts, not the times, are what
this measures. See bench/README.md.
"""

import argparse
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True  # keep bench/ free of __pycache__
import harness as H  # noqa: E402

WORKLOADS = H.H2LOAD_WORKLOADS


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--requests", type=int, default=10000,
                    help="requests per measurement (default 10000; get-1m uses n/10)")
    ap.add_argument("-c", "--connections", type=int, default=1,
                    help="keep-alive connections (default 1)")
    ap.add_argument("--targets", default="nginx,holdfast",
                    help="comma list: nginx, holdfast, holdfast-w2, nginx-w2, direct "
                         "(direct traces the upstream nginx)")
    ap.add_argument("--workloads", default="get-1k,get-1m,post-4k",
                    help=f"comma list of {', '.join(WORKLOADS)} (default get-1k,get-1m,post-4k)")
    ap.add_argument("--top", type=int, default=8, help="syscalls listed per run (8)")
    ap.add_argument("--all-cpus", default="0,1")
    H.add_h2load_args(ap, "syscalls")
    return H.split_h2load_args(ap, ap.parse_args())


def parse_strace_c(text):
    """{syscall: (calls, errors)} and their total, from `strace -c` output.

    Rows are "% time, seconds, usecs/call, calls, [errors], syscall"; the
    errors column is blank when zero. The total is summed from the rows.
    """
    counts = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) < 5 or not re.fullmatch(r"[\d.]+", f[0]) or f[-1] == "total":
            continue
        nums = f[1:-1]
        if len(nums) == 4:
            calls, errors = int(nums[2]), int(nums[3])
        else:
            calls, errors = int(nums[2]), 0
        counts[f[-1]] = (calls, errors)
    return counts, sum(c for c, _ in counts.values())


def trace_one(args, run_dir, target, wl, ctx, upstream):
    path = WORKLOADS[wl][0]
    n = args.requests // 10 if wl == "get-1m" else args.requests
    n = max(n, args.connections)
    stem = f"{wl}-{target.name}"
    if target.kind == "direct":
        proc, port = None, ctx["upstream_port"]
    else:
        proc, port = target.start(run_dir, ctx["upstream_port"], ctx["holdfast"])
    strace = None
    try:
        err = H.wait_ready(proc, port) if proc else None
        if err:
            target.skip = f"failed to start: {err}"
            return None
        url = f"http://127.0.0.1:{port}{path}"
        h2 = H.h2load_argv(wl, args.connections, args.load_cpus)
        subprocess.run(h2 + ["-n", str(max(1000, args.connections)), url],
                       capture_output=True, timeout=120)  # warm-up: pools, caches
        traced = proc if proc else upstream
        # nginx: the worker(s) only; holdfast: the process, -f takes its threads
        pids = traced.pids()[1:] if target.kind in ("nginx", "direct") else [traced.pid]
        out = run_dir / "raw" / f"{stem}.strace"
        argv = ["strace", "-c", "-f", "-o", str(out)]
        for p in pids:
            argv += ["-p", str(p)]
        err_path = run_dir / "logs" / f"{stem}.strace.err"
        strace = H.start(f"strace-{stem}", argv, err_path)
        threads = sum(len(list(Path(f"/proc/{p}/task").iterdir())) for p in pids)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # one "Process N attached" per thread
            if err_path.read_text(errors="replace").count("attached") >= threads:
                break
            time.sleep(0.05)
        time.sleep(0.2)
        r = subprocess.run(h2 + ["-n", str(n), url], capture_output=True, text=True,
                           timeout=600)
        (run_dir / "raw" / f"{stem}.h2load.txt").write_text(r.stdout + r.stderr)
        strace.popen.send_signal(signal.SIGINT)
        strace.popen.wait(30)
        counts, total = parse_strace_c(out.read_text())
        m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                      r"(\d+) failed, (\d+) errored", r.stdout)
        status_2xx = re.search(r"status codes: (\d+) 2xx", r.stdout)
        done = int(m.group(4)) if m else None
        return {"requests": n, "succeeded": done, "total": total, "counts": counts,
                "ok_2xx": int(status_2xx.group(1)) if status_2xx else None,
                "failed": int(m.group(5)) if m else None}  # `errored` is part of it
    finally:
        if strace and strace.alive():
            strace.stop()
        if proc:
            proc.stop()


def main():
    args = parse_args()
    missing = H.tool_missing(H.NGINX, H.H2LOAD, "strace", "taskset")
    if missing:
        sys.exit(f"missing: {', '.join(missing)} (apt-get install nginx nghttp2-client strace)")
    H.install_cleanup()
    H.raise_nofile()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.out) if args.out else H.BENCH_DIR / "results" / f"{stamp}-syscalls"
    for sub in ("conf", "logs", "raw"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    H.log(f"results in {run_dir}")

    targets = H.make_targets(args.targets, args.proxy_cpus, args.all_cpus)
    holdfast, why = None, None
    if any(t.kind == "holdfast" for t in targets):
        holdfast, why = H.check_holdfast(args.holdfast)
        for t in targets:
            if t.kind == "holdfast" and why:
                t.skip = why
                H.log(f"{t.name} SKIPPED: {why}")

    upstream_port = H.free_port()
    upstream = H.start_upstream(run_dir, upstream_port, args.load_cpus)
    err = H.wait_ready(upstream, upstream_port)
    if err:
        sys.exit(f"upstream nginx did not start: {err}")
    ctx = {"upstream_port": upstream_port, "holdfast": holdfast}

    lines = [f"Syscalls per request (strace -c -f, h2load --h1 -c {args.connections}; "
             f"direct = the upstream nginx itself)", "",
             "| workload | target | requests | syscalls/req | top syscalls per request (errors) |",
             "|---|---|---|---|---|"]
    for wl in args.workloads:
        for t in targets:
            if t.skip:
                lines.append(f"| {wl} | {t.name} | — | skipped | see below |")
                continue
            H.log(f"{wl}: {t.name}")
            res = trace_one(args, run_dir, t, wl, ctx, upstream)
            if res is None:
                lines.append(f"| {wl} | {t.name} | — | skipped | see below |")
                continue
            n = res["succeeded"] or res["requests"]
            top = [kv for kv in sorted(res["counts"].items(), key=lambda kv: -kv[1][0])
                   if kv[1][0] / n >= 0.005][:args.top]
            detail = ", ".join(f"{k} {c / n:.2f}" + (f" ({e / n:.2f})" if e else "")
                               for k, (c, e) in top)
            bad = ""
            if res["succeeded"] != res["requests"] or res["ok_2xx"] != res["requests"]:
                bad = (f" — only {res['succeeded']} of {res['requests']} succeeded, "
                       f"{res['ok_2xx']} 2xx")
            lines.append(f"| {wl} | {t.name} | {n:,} | {res['total'] / n:.2f} | {detail}{bad} |")
            H.log(f"  {res['total'] / n:.2f} syscalls/req{bad}")
    lines.append("")
    lines += [f"- **{t.name} skipped**: {t.skip}" for t in targets if t.skip]
    table = "\n".join(lines) + "\n"
    (run_dir / "syscalls.md").write_text(table)
    print(table)
    H.log(f"raw strace output: {run_dir}/raw")


if __name__ == "__main__":
    main()
