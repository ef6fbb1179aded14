#!/usr/bin/env python3
"""holdfast vs nginx vs no proxy, in one run on one machine. See bench/README.md.

Runs every workload for every target, interleaved round by round
(A B C A B C ...), with the proxy pinned to one CPU and wrk plus the upstream
nginx pinned to the other. Raw output goes to bench/results/<timestamp>/,
the markdown table to stdout and to table.md there.
"""

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True  # keep bench/ free of __pycache__
import harness as H  # noqa: E402
from report import render_table, summarize  # noqa: E402

WORKLOADS = {
    "get-1k": {"label": "GET 1 KiB, keep-alive", "path": "/1k"},
    "get-16k": {"label": "GET 16 KiB, keep-alive", "path": "/16k"},
    "get-1m": {"label": "GET 1 MiB, keep-alive", "path": "/1m"},
    "get-1k-close": {"label": "GET 1 KiB, Connection: close", "path": "/1k",
                     "headers": ["Connection: close"]},
    "post-4k": {"label": "POST 4 KiB", "path": "/post",
                "script": str(H.BENCH_DIR / "post4k.lua")},
    "h2-get-1k": {"label": "GET 1 KiB over HTTPS, HTTP/2", "path": "/1k", "h2": True,
                  "conns": ", h2load 16 conns × 4 streams"},
    "idle": {"label": "idle keep-alive connections", "idle": True},
}
DEFAULT_TARGETS = "direct,nginx,holdfast,holdfast-w2"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="3 s per run, 1 s warm-up (default: 10 s, 2 s)")
    ap.add_argument("--duration", type=float, help="seconds per measured run")
    ap.add_argument("--warmup", type=float, help="seconds of unmeasured load first")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--targets", default=DEFAULT_TARGETS,
                    help=f"comma list (default {DEFAULT_TARGETS}; also nginx-w2, holdfast-log, nginx-log)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma list (default all: {','.join(WORKLOADS)})")
    ap.add_argument("--connections", type=int, default=64, help="wrk -c (default 64)")
    ap.add_argument("--threads", type=int, default=1, help="wrk -t (default 1)")
    ap.add_argument("--idle-conns", type=int, default=10000,
                    help="connections held open in the idle workload (default 10000)")
    ap.add_argument("--holdfast", help="holdfast binary (default: see README)")
    ap.add_argument("--proxy-cpus", default="0", help="taskset list for the proxy (0)")
    ap.add_argument("--load-cpus", default="1",
                    help="taskset list for wrk and the upstream (1)")
    ap.add_argument("--all-cpus", default="0,1",
                    help="taskset list for the -w2 targets (0,1)")
    ap.add_argument("--upstream-port", type=int, help="default: an ephemeral port")
    ap.add_argument("--proxy-port", type=int, help="default: a new ephemeral port per run")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                    help="before each run, wait up to S seconds for the machine to "
                         "be quiet (CPU use under --quiet-below); default 0")
    ap.add_argument("--quiet-below", type=float, default=10, metavar="PCT",
                    help="what --wait-quiet calls quiet: machine CPU use, in %% of "
                         "one CPU, sampled over 1 s (default 10)")
    ap.add_argument("--perf-counts", action="store_true",
                    help="count the proxy's syscalls and context switches per request "
                         "under the real load (perf stat, software events; adds a "
                         "little overhead to both proxies)")
    ap.add_argument("--out", help="results dir (default bench/results/<timestamp>)")
    args = ap.parse_args(argv)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    args.targets = [t for t in args.targets.split(",") if t]
    args.workloads = [w for w in args.workloads.split(",") if w]
    for w in args.workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}; known: {', '.join(WORKLOADS)}")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    return args


# === wrk ===

def wrk_argv(args, wl, port, seconds):
    argv = ["taskset", "-c", args.load_cpus, H.WRK, "-t", str(args.threads),
            "-c", str(args.connections), "-d", f"{seconds:g}s", "--latency",
            "--timeout", "5s"]
    for h in wl.get("headers", []):
        argv += ["-H", h]
    if wl.get("script"):
        argv += ["-s", wl["script"]]
    return argv + [f"http://127.0.0.1:{port}{wl['path']}"]


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def _ms(text):
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else None


def count_ok(r):
    """Adds `ok`, the responses with a status under 400, and turns `rps` into their
    rate (the tool's own figure stays in `rps_tool`). wrk's Requests/sec and its
    request count include error responses (h2load's req/s too), so a proxy that
    answered 502 at once would otherwise show more req/s and less CPU per request.
    Per-request figures divide by `ok`."""
    r["rps_tool"] = r["rps"]
    if r["requests"] is not None:
        r["ok"] = max(0, r["requests"] - r["non2xx"])
        if r["rps"] is not None and r["requests"]:
            r["rps"] = r["rps"] * r["ok"] / r["requests"]
    return r


def parse_wrk(out):
    r = {"requests": None, "rps": None, "p50_ms": None, "p99_ms": None,
         "socket_errors": 0, "non2xx": 0}
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if m:
        r["requests"] = int(m.group(1))
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        r["rps"] = float(m.group(1))
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        if m:
            r[key] = _ms(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        r["socket_errors"] = sum(int(x) for x in m.groups())
        r["socket_errors_detail"] = m.group(0)
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        r["non2xx"] = int(m.group(1))  # wrk counts statuses of 400 and above
    return count_ok(r)


def run_h2load(args, wl, port, seconds, out_path):
    """HTTP/2 over TLS (ALPN h2): 16 connections, 4 streams each (64 in flight)."""
    argv = ["taskset", "-c", args.load_cpus, H.H2LOAD, "-t", "1", "-c", "16", "-m", "4",
            "-D", f"{max(1, round(seconds))}", f"https://127.0.0.1:{port}{wl['path']}"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    out_path.write_text(" ".join(argv) + "\n\n" + p.stdout + p.stderr)
    return p.stdout + p.stderr, p.returncode


def parse_h2load(out):
    """h2load gives req/s and counts; no latency percentiles (only min/max/mean)."""
    r = {"requests": None, "rps": None, "p50_ms": None, "p99_ms": None,
         "socket_errors": 0, "non2xx": 0}
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    if m:
        r["rps"] = float(m.group(1))
    m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    if m:
        _total, done, _ok, failed, errored, _timeout = (int(x) for x in m.groups())
        # Nested counts: `timeout` is part of `errored` (requests lost to the
        # network, a reset or a timeout: no response), which is part of `failed`
        # (those plus responses with a status of 400 or more). `done` counts both
        # kinds; the responses are done - errored, as wrk's count is.
        r["requests"] = done - errored
        r["socket_errors"] = errored
        r["non2xx"] = failed - errored
    m = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
    if m:
        r["mean_ms"] = _ms(m.group(1))
    return count_ok(r)


def run_wrk(args, wl, port, seconds, out_path):
    argv = wrk_argv(args, wl, port, seconds)
    p = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    out_path.write_text(" ".join(argv) + "\n\n" + p.stdout + p.stderr)
    return p.stdout + p.stderr, p.returncode


# === one measured run ===

def measure_http(args, run_dir, wl_name, target, rnd, upstream, ctx):
    wl = WORKLOADS[wl_name]
    raw = run_dir / "raw" / wl_name
    raw.mkdir(parents=True, exist_ok=True)
    stem = f"{target.name}-r{rnd}"
    h2 = wl.get("h2", False)
    if h2 and target.kind == "direct":
        return {"error": "n/a (the upstream speaks plain HTTP/1.1)"}
    run_load, parse = (run_h2load, parse_h2load) if h2 else (run_wrk, parse_wrk)
    proc, port = target.start(run_dir, ctx["upstream_port"], ctx["holdfast"],
                              args.proxy_port, tls=H.tls_files() if h2 else None)
    try:
        err = H.wait_ready(proc, port, tls=h2)
        if err and h2:
            # Only this workload: the target may still serve plain HTTP.
            return {"error": f"failed to start with TLS: {err}"}
        if err:
            target.skip = f"failed to start: {err}"
            return {"error": target.skip}
        run_load(args, wl, port, args.warmup, raw / f"{stem}-warmup.txt")
        pids = proc.pids() if proc else []
        up_pids = upstream.pids()
        perf = (H.start_perf_counts(pids, raw / f"{stem}.perf.csv")
                if args.perf_counts and pids else None)
        before = (H.cpu_split(pids), H.cpu_ticks(up_pids), H.system_ticks(),
                  resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic())
        out, rc = run_load(args, wl, port, args.duration, raw / f"{stem}.txt")
        after = (H.cpu_split(pids), H.cpu_ticks(up_pids), H.system_ticks(),
                 resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic())
        counts = H.stop_perf_counts(perf, raw / f"{stem}.perf.csv") if perf else {}
        res = parse(out)
        res["wrk_rc"] = rc
        wall = after[4] - before[4]
        proxy_user_ticks = after[0][0] - before[0][0]
        proxy_ticks = proxy_user_ticks + after[0][1] - before[0][1]
        up_ticks = after[1] - before[1]
        wrk_ticks = ((after[3].ru_utime + after[3].ru_stime)
                     - (before[3].ru_utime + before[3].ru_stime)) * H.CLK_TCK
        busy = after[2][0] - before[2][0]
        steal = after[2][1] - before[2][1]
        res.update(wall_s=wall, proxy_ticks=proxy_ticks if proc else None,
                   upstream_ticks=up_ticks, wrk_ticks=round(wrk_ticks),
                   background_cpu_pct=100 * max(0, busy - proxy_ticks - up_ticks
                                               - wrk_ticks) / H.CLK_TCK / wall,
                   steal_pct=100 * steal / H.CLK_TCK / wall)
        # The load side (wrk and the upstream, on their own CPU) pays for every
        # request too, and more when the bytes cross to another CPU and back: when
        # it is saturated, req/s measures its cost, not the proxy's speed.
        load_ticks = up_ticks + round(wrk_ticks)
        res["load_busy_pct"] = 100 * load_ticks / H.CLK_TCK / wall
        ok = res.get("ok")
        if ok:
            res["load_ms_per_1k"] = load_ticks * 1000 / H.CLK_TCK / (ok / 1000)
        if proc:
            if not proc.alive():
                target.skip = (f"exited during {wl_name} round {rnd} with code "
                               f"{proc.popen.returncode}: {proc.stderr_tail()}")
                res["error"] = target.skip
                return res
            res["peak_rss_kb"] = H.status_kb(proc.pids(), "VmHWM")
            if ok:
                res["cpu_ms_per_1k"] = proxy_ticks * 1000 / H.CLK_TCK / (ok / 1000)
            res["cpu_busy_pct"] = 100 * proxy_ticks / H.CLK_TCK / wall
            if proxy_ticks:
                res["cpu_user_pct"] = 100 * proxy_user_ticks / proxy_ticks
            if counts and ok:
                for key, event in (("syscalls_per_req", "raw_syscalls:sys_enter"),
                                   ("cswitch_per_req", "context-switches"),
                                   ("faults_per_req", "page-faults")):
                    if event in counts:
                        res[key] = counts[event] / ok
        if res["rps"] is None:
            res["error"] = f"load output not understood (rc {rc}); see {raw / stem}.txt"
        return res
    finally:
        if proc:
            proc.stop()


def measure_idle(args, run_dir, target, rnd, ctx):
    if target.kind == "direct":
        return {"error": "n/a (no proxy)"}
    raw = run_dir / "raw" / "idle"
    raw.mkdir(parents=True, exist_ok=True)
    stem = f"{target.name}-r{rnd}"
    proc, port = target.start(run_dir, ctx["upstream_port"], ctx["holdfast"],
                              args.proxy_port)
    client = None
    try:
        err = H.wait_ready(proc, port)
        if err:
            target.skip = f"failed to start: {err}"
            return {"error": target.skip}
        run_wrk(args, WORKLOADS["get-1k"], port, 1, raw / f"{stem}-warmup.txt")
        time.sleep(0.5)
        rss0 = H.status_kb(proc.pids(), "VmRSS")
        argv = ["taskset", "-c", args.load_cpus, sys.executable,
                str(H.BENCH_DIR / "idle_conns.py"), str(port), str(args.idle_conns)]
        popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=open(raw / f"{stem}-client.err", "wb"), text=True)
        client = H.Proc("idle-client", popen, raw / f"{stem}-client.err")
        H.STARTED.append(client)
        ready = popen.stdout.readline().strip()  # blocks until all are open
        time.sleep(1.0)
        rss1 = H.status_kb(proc.pids(), "VmRSS")
        hwm = H.status_kb(proc.pids(), "VmHWM")
        alive = proc.alive()
        popen.stdin.write("done\n")
        popen.stdin.flush()
        closed = popen.stdout.readline().strip()
        popen.wait(30)
        (raw / f"{stem}.txt").write_text(
            f"{' '.join(argv)}\n{ready}\n{closed}\nVmRSS before {rss0} kB\n"
            f"VmRSS after {rss1} kB\nVmHWM {hwm} kB\n")
        m = re.match(r"READY ok=(\d+) failed=(\d+)", ready)
        if not m:
            return {"error": f"idle client said {ready!r}; see {raw}/{stem}-client.err"}
        ok, failed = int(m.group(1)), int(m.group(2))
        # Connections the proxy closed (asked right after the RSS reading) no
        # longer take memory: the divisor is the connections still held.
        by_peer = int(closed.split()[-1]) if closed else 0
        held = ok - by_peer
        res = {"conns_ok": held, "conns_answered": ok, "conns_failed": failed,
               "rss_before_kb": rss0, "rss_after_kb": rss1, "peak_rss_kb": hwm,
               "client": ready, "closed_by_peer": int(closed.split()[-1]) if closed else None}
        if not alive:
            target.skip = f"exited during idle round {rnd}: {proc.stderr_tail()}"
            res["error"] = target.skip
        elif held > 0:
            res["kb_per_conn"] = (rss1 - rss0) / held
        if alive and by_peer:
            res["error"] = (f"{target.name} closed {by_peer} of {ok} idle connections "
                            f"before their RSS was read (round {rnd}); RSS per conn is over "
                            "the ones still open")
        return res
    finally:
        if client:
            client.stop()
        if proc:
            proc.stop()


# === main ===

def machine_info():
    def sh(cmd):
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except subprocess.TimeoutExpired:
            return "(timeout)"
    return {
        "nproc": os.cpu_count(),
        "cpu": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip(),
        "hypervisor": sh("lscpu | grep -i 'hypervisor vendor' | cut -d: -f2").strip(),
        "kernel": platform.release(),
        "loadavg": sh("cat /proc/loadavg"),
        "nginx": sh(f"{H.NGINX} -v 2>&1"),
        "wrk": sh(f"{H.WRK} --version 2>&1 | head -1"),
        "clk_tck": H.CLK_TCK,
        "python": platform.python_version(),
    }


def main():
    args = parse_args()
    missing = H.tool_missing(H.NGINX, H.WRK, "taskset")
    if missing:
        sys.exit(f"missing: {', '.join(missing)} (apt-get install nginx wrk util-linux)")
    h2_missing = H.tool_missing(H.H2LOAD, "openssl")
    h2_workloads = [w for w in args.workloads if WORKLOADS[w].get("h2")]
    if h2_missing and h2_workloads:
        H.log(f"skipping {', '.join(h2_workloads)}: missing {', '.join(h2_missing)} "
              "(apt-get install nghttp2-client openssl)")
        args.workloads = [w for w in args.workloads if w not in h2_workloads]
    H.install_cleanup()
    nofile = H.raise_nofile()
    if "idle" in args.workloads and nofile < args.idle_conns + 1000:
        H.log(f"fd limit is {nofile}: lowering --idle-conns to {nofile - 1000}")
        args.idle_conns = max(100, nofile - 1000)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.out) if args.out else H.BENCH_DIR / "results" / stamp
    for sub in ("conf", "logs", "raw"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    H.log(f"results in {run_dir}")

    targets = H.make_targets(args.targets, args.proxy_cpus, args.all_cpus)
    holdfast, why = (None, None)
    if any(t.kind == "holdfast" for t in targets):
        holdfast, why = H.check_holdfast(args.holdfast)
        if why:
            H.log(f"holdfast SKIPPED: {why}")
            for t in targets:
                if t.kind == "holdfast":
                    t.skip = why
        else:
            H.log(f"holdfast: {holdfast}")

    info = machine_info()
    info["holdfast"] = str(holdfast) if holdfast else why
    (run_dir / "machine.json").write_text(json.dumps(info, indent=2) + "\n")
    if (info["nproc"] or 0) < 2:
        H.log("WARNING: fewer than 2 CPUs; proxy and load generator share a CPU")

    upstream_port = args.upstream_port or H.free_port()
    upstream = H.start_upstream(run_dir, upstream_port, args.load_cpus)
    err = H.wait_ready(upstream, upstream_port)
    if err:
        sys.exit(f"upstream nginx did not start: {err}")
    ctx = {"upstream_port": upstream_port, "holdfast": holdfast}

    runs = []  # one dict per (workload, round, target)
    for wl_name in args.workloads:
        for rnd in range(1, args.rounds + 1):
            for t in targets:
                if t.skip:
                    continue
                H.log(f"{wl_name} round {rnd}/{args.rounds}: {t.name}")
                quiet = None
                if args.wait_quiet > 0:
                    pct, waited = H.wait_quiet(args.wait_quiet, args.quiet_below)
                    quiet = {"busy_pct_before": pct, "waited_s": waited}
                    if waited > 1.5:
                        H.log(f"  waited {waited:.0f}s for quiet; now {pct:.0f}% busy")
                if WORKLOADS[wl_name].get("idle"):
                    res = measure_idle(args, run_dir, t, rnd, ctx)
                else:
                    res = measure_http(args, run_dir, wl_name, t, rnd, upstream, ctx)
                res.update(workload=wl_name, target=t.name, round=rnd, quiet=quiet)
                runs.append(res)
                H.log("  " + brief(res))
                if not upstream.alive():
                    sys.exit(f"upstream nginx died: {upstream.stderr_tail()}")

    skipped = {t.name: t.skip for t in targets if t.skip}
    summary = summarize(runs, [t.name for t in targets], args.workloads)
    table = render_table(summary, [t.name for t in targets], args.workloads,
                         WORKLOADS, skipped, runs, info, args)
    (run_dir / "results.json").write_text(json.dumps(
        {"args": vars(args), "machine": info, "skipped": skipped, "runs": runs,
         "summary": summary}, indent=2, default=str) + "\n")
    (run_dir / "table.md").write_text(table)
    print(table)
    H.log(f"raw output, configs and logs: {run_dir}")


def brief(res):
    if res.get("error") and "rps" not in res and "kb_per_conn" not in res:
        return res["error"]
    parts = []
    if res.get("rps") is not None:
        if res.get("p99_ms") is not None:
            parts.append(f"{res['rps']:,.0f} req/s p50 {res['p50_ms'] or 0:.2f} ms "
                         f"p99 {res['p99_ms']:.2f} ms")
        else:
            parts.append(f"{res['rps']:,.0f} req/s mean {res.get('mean_ms') or 0:.2f} ms")
    if res.get("cpu_ms_per_1k") is not None:
        parts.append(f"cpu {res['cpu_ms_per_1k']:.1f} ms/1k ({res['cpu_busy_pct']:.0f}% busy)")
    if res.get("kb_per_conn") is not None:
        parts.append(f"{res['kb_per_conn']:.2f} KiB/conn ({res['conns_ok']} open)")
    if res.get("peak_rss_kb"):
        parts.append(f"peak {res['peak_rss_kb'] / 1024:.1f} MiB")
    errs = res.get("socket_errors", 0) + res.get("non2xx", 0)
    if errs:
        parts.append(f"{errs} errors")
    if res.get("background_cpu_pct") is not None:
        parts.append(f"bg {res['background_cpu_pct']:.0f}%")
    if res.get("error"):
        parts.append(res["error"])
    return ", ".join(parts)


if __name__ == "__main__":
    main()
