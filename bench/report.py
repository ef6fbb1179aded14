"""Summaries over rounds and the one markdown table run.py prints.

Per (workload, target): the best round for each figure and the spread
(max - min) / best across rounds. Every figure of a target other than nginx
also gets its ratio to nginx's figure from the same run.
"""

import statistics

# (key, row label, which round is best, format, show the spread, show ratio)
HTTP_ROWS = [
    ("rps", "req/s (spread)", max, "{:,.0f}", True, True),
    ("p50_ms", "p50 latency, ms", min, "{:.2f}", False, True),
    ("p99_ms", "p99 latency, ms", min, "{:.2f}", False, True),
    ("mean_ms", "mean latency, ms (h2load has no percentiles)", min, "{:.2f}", False, True),
    ("cpu_ms_per_1k", "proxy CPU ms per 1k req (spread)", min, "{:.1f}", True, True),
    ("cpu_busy_pct", "proxy CPU busy, % of one CPU", statistics.median, "{:.0f}%",
     False, False),
    # How the proxy's CPU divides: user space (what holdfast's code decides) and the
    # kernel (syscalls, loopback TCP), which any proxy pays about equally.
    ("cpu_user_pct", "of which user space, % (rest: kernel)", statistics.median, "{:.0f}%",
     False, False),
    # wrk plus the upstream, on the load CPU: what the path costs the other side.
    ("load_ms_per_1k", "load side (wrk + upstream) CPU ms per 1k req", min, "{:.1f}", True,
     True),
    ("load_busy_pct", "load side CPU busy, % of one CPU", statistics.median, "{:.0f}%",
     False, False),
    # Only with --perf-counts.
    ("syscalls_per_req", "proxy syscalls per request (perf)", statistics.median, "{:.2f}",
     False, True),
    ("cswitch_per_req", "proxy context switches per request (perf)", statistics.median,
     "{:.3f}", False, True),
    ("faults_per_req", "proxy page faults per request (perf)", statistics.median,
     "{:.3f}", False, True),
    ("peak_rss_mib", "proxy peak RSS, MiB", max, "{:.1f}", False, True),
]
IDLE_ROWS = [
    ("kb_per_conn", "RSS per idle conn, KiB (spread)", min, "{:.2f}", True, True),
    ("peak_rss_mib", "proxy peak RSS, MiB", max, "{:.1f}", False, True),
    ("conns_ok", "connections held", min, "{:,.0f}", False, False),
]


def _values(runs, key):
    out = []
    for r in runs:
        v = r.get(key)
        if key == "peak_rss_mib" and r.get("peak_rss_kb"):
            v = r["peak_rss_kb"] / 1024
        if isinstance(v, (int, float)):
            out.append(float(v))
    return out


def summarize(runs, targets, workloads):
    summary = {}
    for wl in workloads:
        summary[wl] = {}
        for t in targets:
            mine = [r for r in runs if r["workload"] == wl and r["target"] == t]
            if not mine:
                continue
            s = {"rounds": len(mine),
                 "errors": sum(r.get("socket_errors", 0) + r.get("non2xx", 0) for r in mine),
                 "notes": sorted({r["error"] for r in mine if r.get("error")})}
            rows = IDLE_ROWS if wl == "idle" else HTTP_ROWS
            for key, _label, best, _fmt, _spread, _ratio in rows:
                vals = _values(mine, key)
                if not vals:
                    continue
                b = best(vals)
                s[key] = b
                s[key + "_all"] = vals
                if len(vals) > 1 and b:
                    s[key + "_spread"] = (max(vals) - min(vals)) / abs(b)
            for key in ("background_cpu_pct", "steal_pct"):
                vals = _values(mine, key)
                if vals:
                    s[key + "_max"] = max(vals)
            summary[wl][t] = s
    return summary


def _cell(s, key, fmt, spread, nginx):
    if s is None or key not in s:
        return "—"
    text = fmt.format(s[key])
    if spread and key + "_spread" in s:
        text += f" ({100 * s[key + '_spread']:.0f}%)"
    if nginx is not None and nginx is not s and nginx.get(key):
        text += f" ×{s[key] / nginx[key]:.2f}"
    return text


def render_table(summary, targets, workloads, specs, skipped, runs, info, args):
    lines = []
    head = ["workload", "figure"] + targets
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for wl in workloads:
        per = summary.get(wl, {})
        nginx = per.get("nginx")
        label = specs[wl]["label"]
        if wl == "idle":
            label = f"{args.idle_conns:,} {label}"
        else:
            label += specs[wl].get("conns", f", {args.connections} conns")
        rows = IDLE_ROWS if wl == "idle" else HTTP_ROWS
        first = True
        for key, row_label, _best, fmt, spread, ratio in rows:
            cells = []
            for t in targets:
                cell = _cell(per.get(t), key, fmt, spread, nginx if ratio else None)
                cells.append("skipped" if cell == "—" and t in skipped else cell)
            if all(c in ("—", "skipped") for c in cells):
                continue
            lines.append("| " + " | ".join([label if first else "", row_label] + cells) + " |")
            first = False
        errs = [per[t]["errors"] if t in per else 0 for t in targets]
        if any(errs):
            lines.append("| | errors (socket + non-2xx, all rounds) | "
                         + " | ".join(f"{e:,}" for e in errs) + " |")
    lines.append("")
    lines.append(f"Best of {args.rounds} interleaved rounds, {args.duration:g} s each "
                 f"(+{args.warmup:g} s warm-up), wrk -t{args.threads} -c{args.connections}; "
                 f"proxy on CPU {args.proxy_cpus}, wrk and upstream nginx on CPU "
                 f"{args.load_cpus}, -w2 targets on CPUs {args.all_cpus}. "
                 "(n%) = spread (max-min)/best over rounds; ×r = ratio to nginx "
                 "in this run (req/s: higher is better; the rest: lower is better).")
    ceiling = []
    for wl in workloads:
        per = summary.get(wl, {})
        direct = per.get("direct", {}).get("rps")
        for t, s in per.items():
            if t != "direct" and direct and s.get("rps", 0) >= 0.9 * direct:
                ceiling.append(f"{wl}/{t}")
    if ceiling:
        lines.append("- within 10% of direct (the load side, not the proxy, limits "
                     "req/s; compare CPU per 1k req instead): " + ", ".join(ceiling))
    saturated = [f"{wl}/{t}" for wl in workloads for t, s in summary.get(wl, {}).items()
                 if s.get("load_busy_pct", 0) >= 95]
    if saturated:
        lines.append("- load CPU saturated (wrk + upstream ≥ 95% busy: req/s is bounded by "
                     "what the path costs them, not by the proxy): " + ", ".join(saturated))
    for t, why in skipped.items():
        lines.append(f"- **{t} skipped**: {why}")
    notes = sorted({r["error"] for r in runs if r.get("error")} - set(skipped.values())
                   - {"n/a (no proxy)"})
    for n in notes:
        lines.append(f"- note: {n}")
    bg = [r["background_cpu_pct"] for r in runs if r.get("background_cpu_pct") is not None]
    st = [r["steal_pct"] for r in runs if r.get("steal_pct") is not None]
    if bg:
        lines.append(f"- machine: {info.get('nproc')} CPUs ({info.get('cpu')}, "
                     f"{info.get('hypervisor') or 'no hypervisor'}); CPU used by "
                     f"other processes during runs: median {statistics.median(bg):.0f}%, "
                     f"max {max(bg):.0f}% of one CPU; steal max {max(st, default=0):.0f}%"
                     + (" — NOISY, rerun when the machine is quiet"
                        if max(bg) > 10 or max(st, default=0) > 10 else ""))
        # Steal: the hypervisor ran something else while these wanted the CPU; their
        # CPU time is not inflated by it, but batching and latency change.
        stolen = sorted({f"{r['workload']}/{r['target']}" for r in runs
                         if (r.get("steal_pct") or 0) > 10})
        if stolen:
            lines.append("- runs with over 10% steal (compare them with care): "
                         + ", ".join(stolen))
    return "\n".join(lines) + "\n"
