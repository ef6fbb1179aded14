#!/usr/bin/env python3
"""hello.php through holdfast and through nginx, in front of the same php-fpm, in one run.

Story 4 (FastCGI without connection reuse): both proxies keep their FastCGI
connections open, nginx with `fastcgi_keep_conn on` and an upstream `keepalive`
pool, holdfast with FCGI_KEEP_CONN and its pool. Same machine layout as run.py:
the proxy on CPU 0 (`--proxy-cpus`), wrk and php-fpm on CPU 1 (`--load-cpus`),
rounds interleaved (nginx, holdfast, nginx, holdfast, ...), each proxy started
afresh per round. php-fpm runs for the whole benchmark.

Figures per round: wrk req/s, and the proxy's CPU time (utime + stime from
/proc, nginx master + worker) per 1,000 requests. The table shows the best round
of each and holdfast's figure as a ratio to nginx's. On a 2-CPU machine wrk and
php-fpm share CPU 1, which is usually the limit: req/s then says little, and CPU
per request is the figure to trust (see bench/README.md).

wrk opens `--connections` (8) connections and php-fpm runs `--php-workers` (8)
workers: no more connections than workers, so nginx, which keeps a connection on
a php-fpm worker until the connection closes, cannot starve php-fpm's accept queue.

Usage:
    CARGO_TARGET_DIR=/work/target-bench cargo build --release -p holdfast
    python3 bench/fastcgi.py --quick        # 3 s runs, 3 rounds, ~1 minute
    python3 bench/fastcgi.py                # 10 s runs, ~2 minutes

Results go to bench/results/<timestamp>-fastcgi/ (table.md, results.json,
raw wrk output, configs, logs).
"""

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True  # keep bench/ free of __pycache__
import harness as H  # noqa: E402
from run import parse_wrk  # noqa: E402

PHP_FPM = "/usr/sbin/php-fpm8.2"
HELLO = "Hello, World!"
TARGETS = ("nginx", "holdfast")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 s runs, 1 s warm-up")
    ap.add_argument("--duration", type=float, help="seconds per measured run (10)")
    ap.add_argument("--warmup", type=float, help="seconds of unmeasured load first (2)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    ap.add_argument("--connections", type=int, default=8, help="wrk -c (8)")
    ap.add_argument("--php-workers", type=int, default=8,
                    help="php-fpm pm.max_children, pm = static (8)")
    ap.add_argument("--post", type=int, default=0, metavar="BYTES",
                    help="POST a body of BYTES to len.php (echoes its length) instead of "
                         "GET hello.php; each proxy keeps its default request buffering "
                         "(nginx: 16 KiB in memory, then a temp file; holdfast: 64 KiB)")
    ap.add_argument("--holdfast", help="holdfast binary (default: as run.py)")
    ap.add_argument("--proxy-cpus", default="0", help="taskset list for the proxy (0)")
    ap.add_argument("--load-cpus", default="1", help="taskset list for wrk and php-fpm (1)")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                    help="before each run, wait up to S s for other CPU use under "
                         "--quiet-below %% of one CPU (default 0: off)")
    ap.add_argument("--quiet-below", type=float, default=10.0, metavar="PCT")
    ap.add_argument("--out", help="results dir (default bench/results/<timestamp>-fastcgi)")
    args = ap.parse_args(argv)
    args.duration = args.duration or (3.0 if args.quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    if args.connections > args.php_workers:
        H.log(f"note: {args.connections} connections over {args.php_workers} php-fpm "
              "workers: nginx may starve php-fpm's accept queue (its kept connections "
              "hold every worker)")
    return args


# === php-fpm and the two proxies ===

def start_php_fpm(run_dir, port, args):
    root = os.geteuid() == 0
    conf = run_dir / "conf" / "php-fpm.conf"
    conf.write_text(f"""[global]
pid = {run_dir}/php-fpm.pid
error_log = {run_dir}/logs/php-fpm-error.log
daemonize = no

[bench]
{"user = root" if root else ""}
{"group = root" if root else ""}
listen = 127.0.0.1:{port}
listen.backlog = 4096
pm = static
pm.max_children = {args.php_workers}
pm.max_requests = 0
""")
    argv = [PHP_FPM, "-y", str(conf), "-F"] + (["-R"] if root else [])
    return H.start("php-fpm", argv, run_dir / "logs" / "php-fpm.out", cpus=args.load_cpus)


def start_nginx(run_dir, port, php_port, www, args):
    tmp, head, http_common = H._nginx_common(run_dir, "nginx")
    conf = run_dir / "conf" / "nginx-fastcgi.conf"
    conf.write_text(f"""{head}worker_processes 1;
http {{
{http_common}
    upstream php {{
        server 127.0.0.1:{php_port};
        keepalive {args.php_workers};
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    client_max_body_size 0;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {www};
        location ~ \\.php$ {{
            try_files $fastcgi_script_name =404;
            fastcgi_pass php;
            fastcgi_keep_conn on;
            fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;
            fastcgi_param QUERY_STRING $query_string;
            fastcgi_param REQUEST_METHOD $request_method;
            fastcgi_param CONTENT_TYPE $content_type;
            fastcgi_param CONTENT_LENGTH $content_length;
            fastcgi_param SCRIPT_NAME $fastcgi_script_name;
            fastcgi_param REQUEST_URI $request_uri;
            fastcgi_param DOCUMENT_URI $document_uri;
            fastcgi_param DOCUMENT_ROOT $document_root;
            fastcgi_param SERVER_PROTOCOL $server_protocol;
            fastcgi_param REQUEST_SCHEME $scheme;
            fastcgi_param GATEWAY_INTERFACE CGI/1.1;
            fastcgi_param SERVER_SOFTWARE nginx/$nginx_version;
            fastcgi_param REMOTE_ADDR $remote_addr;
            fastcgi_param REMOTE_PORT $remote_port;
            fastcgi_param SERVER_ADDR $server_addr;
            fastcgi_param SERVER_PORT $server_port;
            fastcgi_param SERVER_NAME $server_name;
            fastcgi_param REDIRECT_STATUS 200;
        }}
    }}
}}
""")
    return H.start("nginx", [H.NGINX, "-p", str(tmp), "-c", str(conf)],
                   run_dir / "logs" / "nginx.out", cpus=args.proxy_cpus)


def start_holdfast(binary, run_dir, port, php_port, www, args):
    argv = [str(binary), "proxy", "--listen", f"127.0.0.1:{port}",
            "--to", f"fastcgi://127.0.0.1:{php_port}", "--root", str(www),
            "--workers", "1", "--access-log", "off", "--admin", "off"]
    return H.start("holdfast", argv, run_dir / "logs" / "holdfast.out", cpus=args.proxy_cpus)


def upstream_conns(php_port):
    """Established connections to php-fpm's port right now (the proxy's kept ones)."""
    try:
        out = subprocess.run(["ss", "-Htn", "state", "established",
                              f"( dport = :{php_port} )"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return len([line for line in out.splitlines() if line.strip()])


def wait_php(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


# === one measured run ===

def process_ticks():
    """user + nice + system ticks over all CPUs: what processes use. Loopback packet
    processing in softirq is left out, as /proc/PID/stat leaves it out too."""
    with open("/proc/stat") as f:
        user, nice, system = (int(x) for x in f.readline().split()[1:4])
    return user + nice + system


def children_ticks():
    """CPU of our reaped children (wrk), in clock ticks."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (r.ru_utime + r.ru_stime) * H.CLK_TCK


def wrk(args, port, seconds, out_path):
    script = ["-s", str(args.post_script)] if args.post else []
    argv = ["taskset", "-c", args.load_cpus, H.WRK, "-t", "1",
            "-c", str(args.connections), "-d", f"{seconds:g}s", "--latency",
            "--timeout", "5s"] + script + [f"http://127.0.0.1:{port}{args.path}"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    out_path.write_text(" ".join(argv) + "\n\n" + p.stdout + p.stderr)
    return p.stdout + p.stderr


def check_hello(port, args):
    """One request as wrk will send it, and its answer checked."""
    import http.client
    method = "POST" if args.post else "GET"
    want = str(args.post) if args.post else HELLO
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request(method, args.path, body=b"x" * args.post if args.post else None)
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
        conn.close()
    except (OSError, http.client.HTTPException) as exc:
        return f"{method} {args.path} failed: {exc}"
    if resp.status != 200 or body != want:
        return f"{method} {args.path}: {resp.status} {body[:80]!r}"
    return None


def measure(args, run_dir, target, rnd, ctx):
    port = H.free_port()
    if target == "nginx":
        proc = start_nginx(run_dir, port, ctx["php_port"], ctx["www"], args)
    else:
        proc = start_holdfast(ctx["holdfast"], run_dir, port, ctx["php_port"], ctx["www"],
                              args)
    try:
        err = H.wait_ready(proc, port, path="/hello.php") or check_hello(port, args)
        if err:
            return {"error": f"{target}: {err}"}
        if args.wait_quiet > 0:
            pct, waited = H.wait_quiet(args.wait_quiet, args.quiet_below)
            H.log(f"quiet wait {waited:.0f}s, machine at {pct:.0f}%")
        raw = run_dir / "raw"
        wrk(args, port, args.warmup, raw / f"{target}-r{rnd}-warmup.txt")
        pids, php_pids = proc.pids(), ctx["php"].pids()
        t0 = (H.cpu_ticks(pids), H.cpu_ticks(php_pids), process_ticks(),
              time.monotonic(), children_ticks())
        out = wrk(args, port, args.duration, raw / f"{target}-r{rnd}.txt")
        t1 = (H.cpu_ticks(pids), H.cpu_ticks(php_pids), process_ticks(),
              time.monotonic(), children_ticks())
        res = parse_wrk(out)
        res["upstream_conns"] = upstream_conns(ctx["php_port"])
        if not proc.alive():
            res["error"] = f"{target} exited: {proc.stderr_tail()}"
            return res
        wall = t1[3] - t0[3]
        proxy, php, busy = t1[0] - t0[0], t1[1] - t0[1], t1[2] - t0[2]
        wrk_ticks = t1[4] - t0[4]
        res["cpu_busy_pct"] = 100 * proxy / H.CLK_TCK / wall
        res["background_cpu_pct"] = max(
            0.0, 100 * (busy - proxy - php - wrk_ticks) / H.CLK_TCK / wall)
        if res.get("ok"):  # responses with a status under 400 (see run.count_ok)
            k = res["ok"] / 1000
            res["cpu_ms_per_1k"] = proxy * 1000 / H.CLK_TCK / k
            res["php_cpu_ms_per_1k"] = php * 1000 / H.CLK_TCK / k
        return res
    finally:
        proc.stop()


# === report ===

def best(runs, key, pick):
    vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
    return pick(vals) if vals else None


def spread(runs, key, pick):
    vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
    if len(vals) < 2 or not pick(vals):
        return None
    return (max(vals) - min(vals)) / pick(vals)


ROWS = [
    ("rps", "req/s", max, "{:,.0f}", True),
    ("p50_ms", "p50 latency, ms", min, "{:.2f}", False),
    ("p99_ms", "p99 latency, ms", min, "{:.2f}", False),
    ("cpu_ms_per_1k", "proxy CPU ms per 1k req", min, "{:.1f}", True),
    ("cpu_busy_pct", "proxy CPU busy, % of one CPU", statistics.median, "{:.0f}%", False),
    ("php_cpu_ms_per_1k", "php-fpm CPU ms per 1k req", min, "{:.1f}", False),
    ("upstream_conns", "FastCGI connections open at the end", max, "{:.0f}", False),
]


def table(results, args):
    work = f"POST {args.post:,} bytes to len.php" if args.post else "hello.php"
    lines = [f"{work}, {args.connections} keep-alive connections, php-fpm static "
             f"{args.php_workers} workers, {args.rounds} rounds of {args.duration:g} s; "
             f"best round (spread), holdfast ×ratio to nginx",
             "",
             "| figure | nginx | holdfast |",
             "|---|---|---|"]
    summary = {}
    for key, label, pick, fmt, show_spread in ROWS:
        cells = []
        for t in TARGETS:
            v = best(results[t], key, pick)
            summary.setdefault(t, {})[key] = v
            if v is None:
                cells.append("—")
                continue
            cell = fmt.format(v)
            s = spread(results[t], key, pick)
            if show_spread and s is not None:
                cell += f" ({100 * s:.0f}%)"
            n = summary["nginx"].get(key)
            if t == "holdfast" and n and key != "upstream_conns":
                cell += f" ×{v / n:.2f}"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    errors = {t: sum(r.get("socket_errors", 0) + r.get("non2xx", 0) for r in results[t])
              for t in TARGETS}
    failed = {t: [r["error"] for r in results[t] if r.get("error")] for t in TARGETS}
    lines.append("")
    lines.append(f"errors (wrk socket errors + non-2xx, all rounds): "
                 f"nginx {errors['nginx']}, holdfast {errors['holdfast']}")
    for t, errs in failed.items():
        for e in errs:
            lines.append(f"- {t}: {e}")
    bg = [r.get("background_cpu_pct") for t in TARGETS for r in results[t]
          if r.get("background_cpu_pct") is not None]
    if bg:
        worst = max(bg)
        lines.append(f"other CPU use during runs (approximate): up to {worst:.0f}% of one CPU"
                     + (" — NOISY" if worst > 10 else ""))
    ratio = {k: (summary["holdfast"].get(k) / summary["nginx"][k])
             for k in ("rps", "cpu_ms_per_1k")
             if summary["nginx"].get(k) and summary["holdfast"].get(k)}
    if ratio:
        lines.append(f"ratios holdfast/nginx: req/s ×{ratio.get('rps', float('nan')):.2f}, "
                     f"proxy CPU per request ×{ratio.get('cpu_ms_per_1k', float('nan')):.2f} "
                     "(below 1: less CPU than nginx)")
    return "\n".join(lines) + "\n", summary


def main():
    args = parse_args()
    missing = H.tool_missing(H.NGINX, H.WRK, PHP_FPM, "taskset", "ss")
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)} (apt-get install nginx wrk php-fpm "
                         "util-linux iproute2)")
    holdfast, why = H.check_holdfast(args.holdfast)
    if holdfast is None:
        raise SystemExit(f"holdfast: {why}")
    H.install_cleanup()
    H.raise_nofile()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.out) if args.out else H.BENCH_DIR / "results" / f"{stamp}-fastcgi"
    for sub in ("conf", "logs", "raw", "www"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    www = run_dir / "www"
    (www / "hello.php").write_text(f"<?php echo '{HELLO}';\n")
    (www / "len.php").write_text("<?php echo strlen(file_get_contents('php://input'));\n")
    args.path = "/len.php" if args.post else "/hello.php"
    args.post_script = run_dir / "conf" / "post.lua"
    if args.post:
        args.post_script.write_text(
            f'wrk.method = "POST"\nwrk.body = string.rep("x", {args.post})\n'
            'wrk.headers["Content-Type"] = "application/octet-stream"\n')
    php_port = H.free_port()
    php = start_php_fpm(run_dir, php_port, args)
    if not wait_php(php_port):
        raise SystemExit(f"php-fpm did not listen on {php_port}: {php.stderr_tail()}")
    H.log(f"php-fpm pid {php.pid} on 127.0.0.1:{php_port}, {args.php_workers} workers; "
          f"holdfast {holdfast}")
    ctx = {"php": php, "php_port": php_port, "www": www, "holdfast": holdfast}
    results = {t: [] for t in TARGETS}
    for rnd in range(1, args.rounds + 1):
        for target in TARGETS:
            res = measure(args, run_dir, target, rnd, ctx)
            results[target].append(res)
            H.log(f"round {rnd} {target}: "
                  + (res.get("error") or
                     f"{res.get('rps') or 0:,.0f} req/s, proxy "
                     f"{res.get('cpu_ms_per_1k') or 0:.1f} ms CPU/1k req, "
                     f"{res.get('upstream_conns')} FastCGI conns open"))
    text, summary = table(results, args)
    (run_dir / "table.md").write_text(text)
    (run_dir / "results.json").write_text(json.dumps(
        {"args": vars(args), "holdfast": str(holdfast), "results": results,
         "summary": summary}, indent=2, default=str) + "\n")
    print(text)
    H.log(f"raw output, configs and logs: {run_dir}")


if __name__ == "__main__":
    main()
