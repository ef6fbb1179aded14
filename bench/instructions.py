#!/usr/bin/env python3
"""User-space instructions, heap allocations, atomic read-modify-writes and clock
readings per request, under callgrind.

For each proxy (default nginx and holdfast) and each workload: start the
proxy under `valgrind --tool=callgrind` (nginx: `master_process off`, so the
one process is the worker; holdfast: `--workers 1`), warm it up, zero the
counters (`callgrind_control -z`), send exactly N requests over C keep-alive
connections with `h2load --h1 -n N -c C` pinned to CPU 1, dump the counters
(`callgrind_control -d`), stop the proxy, and print per request: instructions
(Ir), calls into the allocator, atomic read-modify-write instructions executed
(x86 `lock`-prefixed ones and `xchg` with memory, found with `objdump -d` in the
per-instruction costs of `--dump-instr=yes`), and calls that read the clock.

The counts are deterministic: they do not depend on what else runs on the
machine, unlike CPU time. They cover the proxy's user space only (no kernel
time, no cache misses: an atomic read-modify-write or a clock reading counts as
one or a few instructions but costs tens of cycles, which is why they are
counted apart). valgrind makes the proxy ~50x slower. See bench/README.md.
"""

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True  # keep bench/ free of __pycache__
import harness as H  # noqa: E402

WORKLOADS = H.H2LOAD_WORKLOADS

# Allocation entry points, per target. holdfast's global allocator is
# mimalloc (the Rust crate calls the *_aligned ones); nginx uses glibc.
ALLOC_FUNCS = {
    "holdfast": {"mi_malloc_aligned", "mi_malloc", "mi_zalloc_aligned", "mi_zalloc",
                 "mi_realloc_aligned", "mi_realloc"},
    "nginx": {"malloc", "calloc", "realloc", "posix_memalign", "memalign",
              # glibc's other names for the same functions, in case valgrind
              # picks one of them for the address
              "__libc_malloc", "__libc_calloc", "__libc_realloc", "__libc_memalign",
              "__posix_memalign"},
}
# Callers inside the allocator itself (one entry point calling another, or
# an internal helper calling back): not an allocation by the program.
ALLOCATOR_INTERNAL = ("mi_", "_mi_", "_int_", "_mid_")

# Functions that read the clock (glibc; the vDSO behind them is not seen by
# valgrind), counted like the allocator's entry points.
CLOCK_FUNCS = {"clock_gettime@@GLIBC_2.17", "clock_gettime", "__clock_gettime",
               "gettimeofday", "__gettimeofday", "__gettimeofday_syscall", "time"}

START_TIMEOUT = 30.0  # s; valgrind takes a few seconds to start a program


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--requests", type=int, default=20000,
                    help="requests per measurement (default 20000)")
    ap.add_argument("-c", "--connections", type=int, default=16,
                    help="keep-alive connections (default 16)")
    ap.add_argument("--warmup", type=int, default=2000,
                    help="requests before the counters are zeroed (default 2000)")
    ap.add_argument("--targets", default="nginx,holdfast",
                    help="comma list: nginx, holdfast, and nginx-log, holdfast-log with "
                         "their access logs on (default nginx,holdfast)")
    ap.add_argument("--workloads", default="get-1k,post-4k",
                    help=f"comma list of {', '.join(WORKLOADS)} (default get-1k,post-4k)")
    H.add_h2load_args(ap, "instructions")
    args = H.split_h2load_args(ap, ap.parse_args())
    known = [*ALLOC_FUNCS, *(f"{k}-log" for k in ALLOC_FUNCS)]
    for t in args.targets:
        if t not in known:
            ap.error(f"unknown target {t!r}; known: {', '.join(known)}")
    return args


def dump_total(path):
    """Total Ir of a callgrind dump: its `summary:` line, else `totals:`."""
    found = {}
    for line in path.read_text(errors="replace").splitlines():
        for key in ("summary:", "totals:"):
            if line.startswith(key) and key not in found:
                found[key] = int(line.split()[1])
    return found.get("summary:", found.get("totals:"))


# "  260,272 ( 0.03%)  < file:function (20,000x) [object]"; the callee line
# has `*` instead of `<`, and no call count.
ANNOTATE_LINE = re.compile(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+([<*>])\s+(.*?)"
                           r"(?: \(([\d,]+)x\))?(?: \[(/[^\]]*)\])?\s*$")


def count_calls(annotate_text, funcs):
    """Calls into `funcs` from outside them (and the allocator), from the output of
    `callgrind_annotate --tree=caller`: entries are separated by blank
    lines; in each, the `*` line is the function and the `<` lines above it
    its callers, each with a call count. A function split over several
    source files (inlined code) has several entries; a call lands in exactly
    one of them, so summing over all entries counts each call once.
    Returns {function: calls}."""
    calls = {}
    for entry in re.split(r"\n[ \t]*\n", annotate_text):
        rows = [m for m in map(ANNOTATE_LINE.match, entry.splitlines()) if m]
        callee = [m for m in rows if m.group(2) == "*"]
        if not callee:
            continue
        fn = callee[0].group(3).split(":", 1)[-1]
        if fn not in funcs:
            continue
        for m in rows:
            if m.group(2) != "<" or not m.group(4):
                continue
            caller = m.group(3).split(":", 1)[-1]
            if caller in funcs or caller.startswith(ALLOCATOR_INTERNAL):
                continue
            calls[fn] = calls.get(fn, 0) + int(m.group(4).replace(",", ""))
    return calls


def count_locked(dump):
    """Atomic read-modify-write instructions executed in a `--dump-instr=yes`
    callgrind dump, or None where that cannot be told (no objdump, not x86-64).

    The dump gives a cost per instruction address and object (`ob=`); the
    line after a `calls=` line is the cost of the call, not of the address,
    and is skipped. `objdump -d` of each object says which addresses hold a
    `lock`-prefixed instruction or an `xchg` with memory (locked implicitly).
    Addresses in the dump and in objdump's output are both the object's own."""
    if H.tool_missing("objdump") or os.uname().machine != "x86_64":
        return None
    names, cost = {}, {}
    ob, last, skip_next = None, 0, False
    obj_line = re.compile(r"^c?ob=\((\d+)\)(?: (.*))?$")
    for line in dump.read_text(errors="replace").splitlines():
        m = obj_line.match(line)
        if m:
            if m.group(2):
                names[m.group(1)] = m.group(2)
            if line.startswith("ob="):
                ob = m.group(1)
            continue
        if line.startswith("calls="):
            skip_next = True
            continue
        if not line or line[0] not in "0123456789+-*":
            continue
        fields = line.split()
        pos = fields[0]
        if pos.startswith("0x"):
            last = int(pos, 16)
        elif pos[0] == "+":
            last += int(pos[1:], 0)
        elif pos[0] == "-":
            last -= int(pos[1:], 0)
        elif pos != "*":
            last = int(pos, 0)
        if skip_next:
            skip_next = False
            continue
        if len(fields) >= 3:
            cost[(ob, last)] = cost.get((ob, last), 0) + int(fields[2])
    locked_insn = re.compile(r"^\s*([0-9a-f]+):\s+(lock |xchg\s+\S*\(|xchg\s+%\w+,\S*\()")
    total = 0
    for ob_id in {o for o, _ in cost}:
        path = names.get(ob_id, "")
        if not path.startswith("/") or not Path(path).is_file():
            continue
        out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path],
                             capture_output=True, text=True).stdout
        locked = {int(m.group(1), 16) for m in map(locked_insn.match, out.splitlines()) if m}
        total += sum(ir for (o, a), ir in cost.items() if o == ob_id and a in locked)
    return total


def wait_dump(run_dir, stem, timeout=60.0):
    """The newest part file (`<stem>.<pid>.callgrind.N`) once it is complete."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        parts = [p for p in (run_dir / "raw").glob(f"{stem}.*.callgrind.*")
                 if p.suffix[1:].isdigit()]
        if parts:
            newest = max(parts, key=lambda p: p.stat().st_mtime)
            if "\ntotals:" in newest.read_text(errors="replace"):
                return newest
        time.sleep(0.2)
    return None


def measure_one(args, run_dir, target, wl, ctx):
    path = WORKLOADS[wl][0]
    n = max(args.requests, args.connections)
    stem = f"{wl}-{target}"
    port = H.free_port()
    wrap = ["valgrind", "--tool=callgrind", "--dump-instr=yes",
            f"--callgrind-out-file={run_dir}/raw/{stem}.%p.callgrind"]
    kind = target.removesuffix("-log")
    access_log = target.endswith("-log")
    if kind == "nginx":
        proc = H.start_nginx_proxy(run_dir, port, ctx["upstream_port"], args.proxy_cpus,
                                   1, target, master=False, wrap=wrap,
                                   access_log=access_log)
    else:
        proc = H.start_holdfast(ctx["holdfast"], run_dir, port, ctx["upstream_port"],
                                args.proxy_cpus, 1, target, wrap=wrap,
                                access_log=access_log)
    try:
        err = H.wait_ready(proc, port, timeout=START_TIMEOUT)
        if err:
            return f"failed to start under valgrind: {err}"
        url = f"http://127.0.0.1:{port}{path}"
        h2 = H.h2load_argv(wl, args.connections, args.load_cpus)
        r = subprocess.run(h2 + ["-n", str(max(args.warmup, args.connections)), url],
                           capture_output=True, text=True, timeout=600)
        (run_dir / "raw" / f"{stem}.warmup.h2load.txt").write_text(r.stdout + r.stderr)
        z = subprocess.run(["callgrind_control", "-z", str(proc.pid)],
                           capture_output=True, text=True, timeout=60)
        if z.returncode != 0:
            return f"callgrind_control -z failed: {(z.stdout + z.stderr).strip()}"
        r = subprocess.run(h2 + ["-n", str(n), url], capture_output=True, text=True,
                           timeout=1800)
        (run_dir / "raw" / f"{stem}.h2load.txt").write_text(r.stdout + r.stderr)
        d = subprocess.run(["callgrind_control", "-d", str(proc.pid)],
                           capture_output=True, text=True, timeout=120)
        if d.returncode != 0:
            return f"callgrind_control -d failed: {(d.stdout + d.stderr).strip()}"
        dump = wait_dump(run_dir, stem)
        proc.stop(timeout=30)  # valgrind writes its final dump on the way out
        if dump is None:
            return f"no callgrind dump {stem}.*.callgrind.N in {run_dir}/raw"
        total = dump_total(dump)
        a = subprocess.run(["callgrind_annotate", "--tree=caller", "--threshold=100",
                            "--auto=no", str(dump)], capture_output=True, text=True,
                           timeout=300)
        (run_dir / "raw" / f"{stem}.annotate.txt").write_text(a.stdout + a.stderr)
        allocs = count_calls(a.stdout, ALLOC_FUNCS[kind])
        clock = count_calls(a.stdout, CLOCK_FUNCS)
        locked = count_locked(dump)
        m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                      r"(\d+) failed, (\d+) errored", r.stdout)
        status_2xx = re.search(r"status codes: (\d+) 2xx", r.stdout)
        return {"requests": n, "succeeded": int(m.group(4)) if m else None,
                "ok_2xx": int(status_2xx.group(1)) if status_2xx else None,
                "total": total, "allocs": allocs, "clock": clock, "locked": locked,
                "dump": dump}
    finally:
        proc.stop(timeout=30)


def main():
    args = parse_args()
    missing = H.tool_missing(H.NGINX, H.H2LOAD, "valgrind", "callgrind_control",
                             "callgrind_annotate", "taskset")
    if missing:
        sys.exit(f"missing: {', '.join(missing)} (apt-get install nginx nghttp2-client valgrind)")
    H.install_cleanup()
    H.raise_nofile()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.out) if args.out else H.BENCH_DIR / "results" / f"{stamp}-instructions"
    for sub in ("conf", "logs", "raw"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    H.log(f"results in {run_dir}")

    skip = {}
    holdfast = None
    if any(t.startswith("holdfast") for t in args.targets):
        holdfast, why = H.check_holdfast(args.holdfast)
        if why:
            for t in args.targets:
                if t.startswith("holdfast"):
                    skip[t] = why
            H.log(f"holdfast SKIPPED: {why}")

    upstream_port = H.free_port()
    upstream = H.start_upstream(run_dir, upstream_port, args.load_cpus)
    err = H.wait_ready(upstream, upstream_port)
    if err:
        sys.exit(f"upstream nginx did not start: {err}")
    ctx = {"upstream_port": upstream_port, "holdfast": holdfast}

    lines = [f"User-space instructions, allocations, atomic read-modify-writes and clock "
             f"readings per request (callgrind, h2load --h1 -c {args.connections}; nginx: "
             f"master_process off, holdfast: --workers 1)", "",
             "| workload | target | requests | instructions/req | ratio to nginx "
             "| allocations/req | atomic RMW/req | clock reads/req |",
             "|---|---|---|---|---|---|---|---|"]
    for wl in args.workloads:
        rows = {}  # target -> (requests, Ir/req, allocations/req, atomics, clock, note)
        for t in args.targets:
            if t in skip:
                continue
            H.log(f"{wl}: {t} under callgrind")
            res = measure_one(args, run_dir, t, wl, ctx)
            if isinstance(res, str):
                skip[t] = res
                H.log(f"{t} SKIPPED: {res}")
                continue
            n = res["succeeded"] or res["requests"]
            ir = res["total"] / n
            allocs = sum(res["allocs"].values()) / n
            clock = sum(res["clock"].values()) / n
            locked = "—" if res["locked"] is None else f"{res['locked'] / n:.1f}"
            bad = ""
            if res["succeeded"] != res["requests"] or res["ok_2xx"] != res["requests"]:
                bad = (f" — only {res['succeeded']} of {res['requests']} succeeded, "
                       f"{res['ok_2xx']} 2xx")
            rows[t] = (n, ir, allocs, locked, clock, bad)
            H.log(f"  {ir:,.0f} instructions/req, {allocs:.2f} allocations/req, "
                  f"{locked} atomic RMW/req, {clock:.2f} clock reads/req "
                  f"({res['dump'].name}){bad}")
        base = rows["nginx"][1] if "nginx" in rows else None
        for t in args.targets:
            if t not in rows:
                lines.append(f"| {wl} | {t} | — | skipped | — | see below | — | — |")
                continue
            n, ir, allocs, locked, clock, bad = rows[t]
            ratio = f"×{ir / base:.2f}" if base else "—"
            lines.append(f"| {wl} | {t} | {n:,} | {ir:,.0f} | {ratio} | {allocs:.2f} "
                         f"| {locked} | {clock:.2f}{bad} |")
    lines.append("")
    lines += [f"- **{t} skipped**: {why}" for t, why in skip.items()]
    table = "\n".join(lines) + "\n"
    (run_dir / "instructions.md").write_text(table)
    print(table)
    H.log(f"callgrind dumps, annotations and h2load output: {run_dir}/raw")


if __name__ == "__main__":
    main()
