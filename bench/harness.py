"""Shared pieces of the benchmark harness: processes, configs, /proc readings.

Scope: starting and stopping the upstream nginx, the proxies under test
(holdfast, nginx) and reading their CPU time and RSS from /proc. Not here:
load generation and reporting (run.py), syscall counting (syscalls.py),
instruction counting (instructions.py).

Every process is started with subprocess.Popen, remembered in `STARTED`, and
stopped by its PID (SIGTERM, then SIGKILL) when the harness exits, however it
exits. Nothing is ever killed by name.
"""

import atexit
import http.client
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
NGINX = "/usr/sbin/nginx"
WRK = "/usr/bin/wrk"
H2LOAD = "/usr/bin/h2load"
CLK_TCK = int(subprocess.run(["getconf", "CLK_TCK"], capture_output=True,
                             text=True, check=True).stdout.strip())

# Files the upstream serves: URL path -> size in bytes.
STATIC_FILES = {"/1k": 1024, "/16k": 16 * 1024, "/1m": 1024 * 1024}


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# === process bookkeeping ===

STARTED = []  # every Proc we started, stopped in reverse order at exit


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path
    # children seen (nginx workers): pid -> start time, so that a later
    # kill hits the same process and never a recycled PID
    children: dict = field(default_factory=dict)

    @property
    def pid(self):
        return self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def pids(self):
        """The process and its children (nginx master + workers)."""
        if not self.alive():
            return []
        kids = children_of(self.pid)
        for k in kids:
            self.children.setdefault(k, _starttime(k))
        return [self.pid] + kids

    def stop(self, timeout=5.0):
        if self.alive():
            self.pids()  # remember the workers before the master goes
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} (pid {self.pid}) ignored SIGTERM; SIGKILL")
                self.popen.kill()
                self.popen.wait()
        # An nginx master killed hard leaves its workers behind: stop them
        # by the PIDs we recorded, if each is still the same process.
        for pid, started in self.children.items():
            if started is not None and _starttime(pid) == started:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self in STARTED:
            STARTED.remove(self)

    def stderr_tail(self, lines=5):
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])


def start(name, argv, log_path, cpus=None, cwd=None, truncate=False):
    """Start argv pinned to `cpus` (taskset execs, so the PID is the program's)."""
    if cpus is not None:
        argv = ["taskset", "-c", cpus] + list(argv)
    out = open(log_path, "wb" if truncate else "ab")
    popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, cwd=cwd)
    out.close()
    proc = Proc(name, popen, Path(log_path))
    STARTED.append(proc)
    return proc


_WORK_DIR = []


def work_dir():
    """Scratch space (served files, nginx temp dirs), removed at exit."""
    if not _WORK_DIR:
        _WORK_DIR.append(Path(tempfile.mkdtemp(prefix="holdfast-bench-")))
        os.chmod(_WORK_DIR[0], 0o755)
    return _WORK_DIR[0]


def stop_all():
    for proc in list(reversed(STARTED)):
        try:
            proc.stop()
        except Exception as exc:  # keep stopping the others
            log(f"stopping {proc.name}: {exc}")
    if _WORK_DIR:
        shutil.rmtree(_WORK_DIR.pop(), ignore_errors=True)


def _on_signal(signum, _frame):
    log(f"signal {signum}: stopping everything we started")
    stop_all()
    sys.exit(128 + signum)


def install_cleanup():
    atexit.register(stop_all)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)


def raise_nofile(want=None):
    """Raise the soft fd limit to the hard one; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want is None else min(want, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# === /proc readings ===

def _read(path):
    with open(path) as f:
        return f.read()


def _stat_fields(pid):
    raw = _read(f"/proc/{pid}/stat")
    # comm may contain spaces; the fields after it start past the last ')'
    return raw[raw.rindex(")") + 2:].split()


def _starttime(pid):
    try:
        return int(_stat_fields(pid)[19])  # field 22: start time in ticks
    except (OSError, ValueError, IndexError):
        return None


def children_of(pid):
    kids = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = _read(f"/proc/{pid}/task/{task}/children").split()
            kids.extend(int(k) for k in text)
    except OSError:
        pass
    return kids


def cpu_ticks(pids):
    """utime + stime of the given processes (all their threads), clock ticks."""
    return sum(cpu_split(pids))


def cpu_split(pids):
    """(utime, stime) of the given processes (all their threads), clock ticks:
    user space against kernel work done for them (syscalls, TCP)."""
    user = system = 0
    for pid in pids:
        try:
            f = _stat_fields(pid)
        except OSError:
            continue
        user += int(f[11])  # field 14 of /proc/PID/stat
        system += int(f[12])  # field 15
    return user, system


PERF_EVENTS = "raw_syscalls:sys_enter,context-switches,page-faults"


def start_perf_counts(pids, out_path):
    """`perf stat` counting software events of `pids` (every thread) until
    stop_perf_counts. Software events and tracepoints work in a VM without
    hardware counters. None if perf is missing."""
    perf = shutil.which("perf")
    if not perf:
        log("perf not found: no syscall or context-switch counts (apt-get install linux-perf)")
        return None
    argv = [perf, "stat", "-x", ",", "-e", PERF_EVENTS, "-o", str(out_path),
            "-p", ",".join(str(p) for p in pids)]
    proc = start("perf", argv, str(out_path) + ".log", truncate=True)
    # perf says nothing when it has attached (its output is written at the end),
    # so give it a moment before the load starts.
    time.sleep(0.2)
    return proc


def stop_perf_counts(proc, out_path):
    """Stops perf (SIGINT makes it print) and returns {event: count}."""
    proc.popen.send_signal(signal.SIGINT)
    try:
        proc.popen.wait(10)
    except subprocess.TimeoutExpired:
        pass
    proc.stop()  # SIGTERM only if it is still running; forgets it either way
    counts = {}
    try:
        lines = Path(out_path).read_text().splitlines()
    except OSError:
        return counts
    for line in lines:
        f = line.split(",")
        # CSV: value, unit, event, ...; "<not counted>" values are skipped
        if len(f) >= 3 and f[0].replace(".", "").isdigit():
            counts[f[2]] = float(f[0])
    return counts


def status_kb(pids, key):
    """Sum of a /proc/PID/status field (VmRSS, VmHWM) over pids, in KiB."""
    total = 0
    for pid in pids:
        try:
            for line in _read(f"/proc/{pid}/status").splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def system_ticks():
    """(busy, steal) ticks summed over all CPUs, from /proc/stat."""
    f = [int(x) for x in _read("/proc/stat").splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = f[:8]
    return user + nice + system + irq + softirq, steal


def wait_quiet(max_wait, below_pct=10.0, sample=1.0):
    """Wait up to max_wait s until the whole machine's busy CPU, sampled over
    `sample` s, is under below_pct of one CPU. Returns (last busy %, waited s).
    Call it while nothing of ours is under load."""
    t0 = time.monotonic()
    while True:
        b0 = system_ticks()[0]
        time.sleep(sample)
        pct = 100 * (system_ticks()[0] - b0) / CLK_TCK / sample
        waited = time.monotonic() - t0
        if pct < below_pct or waited >= max_wait:
            return pct, waited


# === network helpers ===

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc, port, path="/1k", timeout=10.0, tls=False):
    """Wait until GET path on port answers 200 with the full body (over TLS, not
    verifying the certificate, with `tls`)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    want = STATIC_FILES.get(path)
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            return f"exited with code {proc.popen.returncode}: {proc.stderr_tail()}"
        try:
            if tls:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=2,
                                                   context=ctx)
            else:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            if resp.status == 200 and (want is None or len(body) == want):
                return None
            last = f"HTTP {resp.status}, {len(body)} bytes"
        except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
            last = str(exc) or type(exc).__name__
        time.sleep(0.05)
    return f"not ready after {timeout:.0f}s ({last}): {proc.stderr_tail() if proc else ''}"


# === h2load: a fixed number of requests (syscalls.py, instructions.py) ===

# name -> (path, POST body size or None)
# name -> (path, POST body size or None, extra request fields)
H2LOAD_WORKLOADS = {
    "get-1k": ("/1k", None, []),
    "get-16k": ("/16k", None, []),
    "get-1m": ("/1m", None, []),
    "post-4k": ("/post", 4096, []),
    # h2load opens a new connection after each `Connection: close` response
    "churn-1k": ("/1k", None, ["Connection: close"]),
}


def add_h2load_args(ap, out_suffix):
    """The flags syscalls.py and instructions.py share (after their own)."""
    ap.add_argument("--holdfast", help="holdfast binary (default: see README)")
    ap.add_argument("--proxy-cpus", default="0")
    ap.add_argument("--load-cpus", default="1")
    ap.add_argument("--out",
                    help=f"results dir (default bench/results/<timestamp>-{out_suffix})")


def split_h2load_args(ap, args):
    """Turns --targets and --workloads into lists; unknown workloads are errors."""
    args.targets = [t for t in args.targets.split(",") if t]
    args.workloads = [w for w in args.workloads.split(",") if w]
    for w in args.workloads:
        if w not in H2LOAD_WORKLOADS:
            ap.error(f"unknown workload {w!r}")
    return args


def h2load_argv(workload, connections, load_cpus):
    """h2load over HTTP/1.1 keep-alive connections, pinned to `load_cpus`, with the
    workload's POST body and request fields if it has them; append `-n N URL`."""
    _, body, fields = H2LOAD_WORKLOADS[workload]
    argv = ["taskset", "-c", load_cpus, H2LOAD, "--h1", "-c", str(connections)]
    for field in fields:
        argv += ["-H", field]
    if body:
        data = work_dir() / f"post-body-{body}"
        data.write_bytes(b"x" * body)
        argv += ["-d", str(data)]
    return argv


# === nginx: upstream and proxy ===

def _nginx_common(run_dir, name, master=True):
    tmp = work_dir() / "nginx" / name
    tmp.mkdir(parents=True, exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    return tmp, f"""{user}daemon off;
master_process {"on" if master else "off"};
pid {tmp}/nginx.pid;
error_log {run_dir}/logs/{name}-error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 20000; }}
""", f"""    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    access_log off;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
"""


def write_static_files(www):
    www.mkdir(parents=True, exist_ok=True)
    for path, size in STATIC_FILES.items():
        (www / path.lstrip("/")).write_bytes(b"x" * size)


def start_upstream(run_dir, port, cpus):
    """The fast origin: nginx, 1 worker, static files, POST /post -> 200."""
    www = work_dir() / "www"
    write_static_files(www)
    tmp, head, http_common = _nginx_common(run_dir, "upstream")
    conf = run_dir / "conf" / "upstream.conf"
    conf.write_text(f"""{head}worker_processes 1;
http {{
{http_common}    sendfile on;
    tcp_nopush on;
    open_file_cache max=16 inactive=300s;
    open_file_cache_valid 300s;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {www};
        location = /post {{ return 200; }}
    }}
}}
""")
    proc = start("upstream", [NGINX, "-p", str(tmp), "-c", str(conf)],
                 run_dir / "logs" / "upstream.out", cpus=cpus)
    return proc


def start_nginx_proxy(run_dir, port, upstream_port, cpus, workers=1, tag="nginx",
                      master=True, wrap=(), access_log=False, tls=None):
    """master=False: one process that is the worker; wrap: argv prefix (valgrind);
    access_log: nginx's default `combined` log to a file in the scratch directory,
    emptied at each start (the `holdfast-log` counterpart); tls: (cert, key) paths:
    HTTPS with HTTP/2 (`listen ... ssl http2`, nginx 1.22's form)."""
    tmp, head, http_common = _nginx_common(run_dir, tag, master)
    log = ""
    if access_log:
        (tmp / "access.log").unlink(missing_ok=True)
        log = f"        access_log {tmp}/access.log;\n"
    listen = f"127.0.0.1:{port} backlog=4096"
    if tls:
        listen = f"127.0.0.1:{port} ssl http2 backlog=4096"
        log += (f"        ssl_certificate {tls[0]};\n"
                f"        ssl_certificate_key {tls[1]};\n")
    conf = run_dir / "conf" / f"{tag}.conf"
    conf.write_text(f"""{head}worker_processes {workers};
http {{
{http_common}
    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen {listen};
{log}        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
""")
    return start(tag, [*wrap, NGINX, "-p", str(tmp), "-c", str(conf)],
                 run_dir / "logs" / f"{tag}.out", cpus=cpus)


# === holdfast ===

def find_holdfast(explicit=None):
    """Path of a holdfast binary, or None. Order: flag, $HOLDFAST, build dirs."""
    candidates = []
    if explicit:
        candidates.append(Path(explicit))
    if os.environ.get("HOLDFAST"):
        candidates.append(Path(os.environ["HOLDFAST"]))
    if os.environ.get("CARGO_TARGET_DIR"):
        candidates.append(Path(os.environ["CARGO_TARGET_DIR"]) / "release" / "holdfast")
    candidates += [Path("/work/target-bench/release/holdfast"),
                   REPO_ROOT / "target" / "release" / "holdfast"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    return None


def check_holdfast(explicit=None):
    """(path, None) if `holdfast proxy --help` works, else (None, reason)."""
    path = find_holdfast(explicit)
    if path is None:
        return None, ("binary not found (looked at --holdfast, $HOLDFAST, "
                      "$CARGO_TARGET_DIR, /work/target-bench and target/release); "
                      "build it with: CARGO_TARGET_DIR=/work/target-bench "
                      "cargo build --release -p holdfast")
    try:
        r = subprocess.run([str(path), "proxy", "--help"], capture_output=True,
                           text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{path}: `proxy --help` failed: {exc}"
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
        return None, f"{path}: `proxy --help` exited {r.returncode}: {tail[0]}"
    global HOLDFAST_ADMIN_OFF
    HOLDFAST_ADMIN_OFF = "--admin" in r.stdout
    return path, None


# `proxy --admin off`, when the binary has the flag: its admin listener's fixed
# default port (9901) could collide with anything else on the machine.
HOLDFAST_ADMIN_OFF = False


# Requests per client connection, for both proxies: nginx's `keepalive_requests`
# in its configs above, holdfast's `max_requests_per_connection`. Without it
# holdfast's default (10,000) ends each HTTP/2 connection of the h2load workload
# (16 connections, ~160,000 requests in 3 s) with a GOAWAY that nginx, at
# 1,000,000, never sends: h2load counts the streams the GOAWAY refused as errors
# (it does not retry them) and the two proxies would not do the same work.
KEEPALIVE_REQUESTS = 1000000


def start_holdfast(binary, run_dir, port, upstream_port, cpus, workers, tag, wrap=(),
                   access_log=False, tls=None):
    """tls: (cert, key) paths: serve HTTPS (HTTP/2 and HTTP/1.1 by ALPN).

    What `holdfast proxy --listen ... --to ...` runs (every other setting at its
    default), as a config file, which can also set the per-connection request
    limit that the `proxy` flags do not."""
    conf = [f"workers = {workers}",
            "[log]", f"access_log = {'true' if access_log else 'false'}"]
    if HOLDFAST_ADMIN_OFF:
        conf += ["[admin]", "enabled = false"]
    conf += ["[[listener]]", f'listen = "127.0.0.1:{port}"',
             f"max_requests_per_connection = {KEEPALIVE_REQUESTS}"]
    if tls:
        conf += ["[listener.tls]", f'cert = "{tls[0]}"', f'key = "{tls[1]}"']
    conf += ["[[route]]", 'upstream = "up"',
             "[upstream.up]", f'addresses = ["http://127.0.0.1:{upstream_port}"]']
    conf_path = run_dir / "conf" / f"{tag}.toml"
    conf_path.parent.mkdir(parents=True, exist_ok=True)
    conf_path.write_text("\n".join(conf) + "\n")
    argv = [*wrap, str(binary), "run", "--config", str(conf_path)]
    if access_log:
        # ~150 bytes per request: a real file, but in the scratch directory and
        # started afresh each run, so a full benchmark does not leave gigabytes.
        return start(tag, argv, work_dir() / f"{tag}.out", cpus=cpus, truncate=True)
    return start(tag, argv, run_dir / "logs" / f"{tag}.out", cpus=cpus)


# === targets ===

@dataclass
class Target:
    """One column of the table: how to put a proxy (or none) in front of upstream."""
    name: str
    kind: str          # "direct", "nginx" or "holdfast"
    cpus: str | None   # taskset list for the proxy
    workers: int = 1
    access_log: bool = False  # one line per request, to a file in the scratch directory
    skip: str | None = None  # reason, once known

    def start(self, run_dir, upstream_port, holdfast_bin, fixed_port=None, tls=None):
        """Start the proxy; returns (proc, port). direct -> (None, upstream_port).
        tls: (cert, key): the proxy serves HTTPS with HTTP/2."""
        if self.kind == "direct":
            return None, upstream_port
        port = fixed_port or free_port()
        if self.kind == "nginx":
            proc = start_nginx_proxy(run_dir, port, upstream_port, self.cpus,
                                     self.workers, self.name,
                                     access_log=self.access_log, tls=tls)
        else:
            proc = start_holdfast(holdfast_bin, run_dir, port, upstream_port,
                                  self.cpus, self.workers, self.name,
                                  access_log=self.access_log, tls=tls)
        return proc, port


def make_targets(names, proxy_cpu, all_cpus):
    known = {
        "direct": Target("direct", "direct", None),
        "nginx": Target("nginx", "nginx", proxy_cpu, 1),
        "holdfast": Target("holdfast", "holdfast", proxy_cpu, 1),
        "holdfast-w2": Target("holdfast-w2", "holdfast", all_cpus, 2),
        "holdfast-log": Target("holdfast-log", "holdfast", proxy_cpu, 1, access_log=True),
        "nginx-log": Target("nginx-log", "nginx", proxy_cpu, 1, access_log=True),
        "nginx-w2": Target("nginx-w2", "nginx", all_cpus, 2),
    }
    out = []
    for n in names:
        if n not in known:
            raise SystemExit(f"unknown target {n!r}; known: {', '.join(known)}")
        out.append(known[n])
    return out


def tls_files():
    """A self-signed ECDSA P-256 certificate for 127.0.0.1, made once per run."""
    d = work_dir() / "tls"
    cert, key = d / "cert.pem", d / "key.pem"
    if not cert.exists():
        d.mkdir(parents=True, exist_ok=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True)
    return cert, key


def tool_missing(*paths):
    return [p for p in paths if not (shutil.which(p) or Path(p).exists())]
