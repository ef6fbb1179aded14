"""Open N keep-alive connections, one request each, and hold them open.

Usage: python3 idle_conns.py PORT N [--path /1k] [--concurrency 100]

Protocol with the caller (run.py), over stdout/stdin:
  prints  "READY ok=<n> failed=<n> seconds=<s>"  once every connection has
          had its response (or failed for good), then waits;
  on any line on stdin (or EOF) it prints "CLOSED_BY_PEER <n>" (connections
          the server closed while we held them) and exits, closing them all.

Connects run at most `--concurrency` at a time, so the accept backlog of the
server under test is not what is measured.
"""

import argparse
import asyncio
import resource
import sys
import time


async def one(port, request, sem, state, held):
    for attempt in range(3):
        writer = None
        async with sem:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), 10)
                writer.write(request)
                await writer.drain()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                status = head.split(b" ", 2)[1]
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                await asyncio.wait_for(reader.readexactly(length), 10)
                if status != b"200":
                    raise ConnectionError(f"status {status!r}")
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                    ConnectionError, ValueError, IndexError) as exc:
                state["last_error"] = repr(exc)
                if writer is not None:
                    writer.close()
                continue
        state["ok"] += 1
        held.append(writer)
        # Hold the connection; a read that returns or fails (a reset) means the
        # peer closed it.
        try:
            await reader.read(1)
        except OSError:
            pass
        state["closed"] += 1
        return
    state["failed"] += 1


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("n", type=int)
    ap.add_argument("--path", default="/1k")
    ap.add_argument("--concurrency", type=int, default=100)
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.n + 64:
        print(f"fd limit {hard} too low for {args.n} connections", file=sys.stderr)
        sys.exit(2)

    request = (f"GET {args.path} HTTP/1.1\r\nHost: 127.0.0.1:{args.port}\r\n"
               "User-Agent: holdfast-bench-idle\r\n\r\n").encode()
    sem = asyncio.Semaphore(args.concurrency)
    state = {"ok": 0, "failed": 0, "closed": 0, "last_error": ""}
    held = []
    t0 = time.monotonic()
    tasks = [asyncio.create_task(one(args.port, request, sem, state, held))
             for _ in range(args.n)]
    while state["ok"] + state["failed"] < args.n:
        await asyncio.sleep(0.05)
    took = time.monotonic() - t0
    extra = f" last_error={state['last_error']}" if state["failed"] else ""
    print(f"READY ok={state['ok']} failed={state['failed']} seconds={took:.2f}{extra}",
          flush=True)

    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    print(f"CLOSED_BY_PEER {state['closed']}", flush=True)
    for w in held:
        w.close()
    for t in tasks:
        t.cancel()


if __name__ == "__main__":
    asyncio.run(main())
