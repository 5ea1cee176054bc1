#!/usr/bin/env python3
"""Benchmark POST /subscribe under `newsletter serve` against a trivial Flask endpoint on the same server.

    python bench/subscribe.py [--duration 10] [--connections 32] [--repeat 3] [--database both]
    python bench/subscribe.py --mode clients --database sqlite --profile serve.txt   # where the time goes

`newsletter serve --no-worker` on a fresh database, and a Flask app whose only route is /ping -> "ok",
served by the same code (newsletter.serving: waitress, with the same --processes and --threads; by default
`newsletter serve`'s own defaults). wrk drives both with the same Lua script: every request is a POST of a
form-encoded address unique to the request. The runs alternate between the two servers (--repeat times);
the script prints every run's request rate, latency percentiles and non-2xx statuses, and the median ratio.

Two modes, each on its own fresh database:
- clients: the app sits behind one trusted proxy ([web] trusted_proxies = 1) and every request carries a
  new X-Forwarded-For address, as sign-ups from many readers do; [web] rate_limit stays at its default.
  Every request is a sign-up; the target is judged on this mode.
- shipped: the app as configured by default, all requests from the one client wrk is: after the first
  [web] rate_limit sign-ups every answer is 429. This measures how fast a flood is refused.

After the runs of a mode, the log must hold as many new sign-ups as there were 200 responses (up to the
requests in flight when wrk stopped, which the server completes). Then the worker's step that turns them
into subscribers and confirmation emails (newsletter.signups.process_signups) runs in this process, timed,
and the number of subscribers made must equal the number of sign-ups.

Installs wrk and PostgreSQL with apt-get when missing. Servers and temporary files are removed on exit and
on Ctrl-C.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchkit
from benchkit import BenchError, child_env, run_checked, start

WRK_SCRIPT = r"""
-- One unique address per request (run prefix, wrk thread, counter) and, in the clients mode, one unique
-- client address per request: 10.<run * 4 + thread>.<counter / 250>.<counter % 250>.
local threads = {}
local counter = 0
statuses = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  prefix = args[1] or "run"
  run = tonumber(args[2] or "0")
  clients = args[3] == "clients"
  stamp = args[4] or ""
end

function request()
  counter = counter + 1
  local headers = {["Content-Type"] = "application/x-www-form-urlencoded"}
  if clients then
    headers["X-Forwarded-For"] = string.format("10.%d.%d.%d", (run * 4 + tid) % 256, math.floor(counter / 250) % 256,
                                               counter % 250 + 1)
  end
  local body = "email=" .. prefix .. "-t" .. tid .. "-" .. counter .. "%40example.com&website=&started=" .. stamp
  return wrk.format("POST", nil, headers, body)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for code, count in pairs(thread:get("statuses")) do
      total[code] = (total[code] or 0) + count
    end
  end
  for code, count in pairs(total) do
    io.write(string.format("BENCH status %d %d\n", code, count))
  end
  local e = summary.errors
  io.write(string.format("BENCH requests %d\nBENCH duration_us %d\n", summary.requests, summary.duration))
  io.write(string.format("BENCH errors connect=%d read=%d write=%d timeout=%d\n", e.connect, e.read, e.write,
                         e.timeout))
  io.write(string.format("BENCH latency_p50_ms %.2f\nBENCH latency_p99_ms %.2f\n",
                         latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""

PING_APP = """
import logging
import sys

from flask import Flask
from waitress import serve

from newsletter.serving import WAITRESS_OPTIONS, listen, serve_forked

app = Flask(__name__)


@app.route("/ping", methods=["GET", "POST"])
def ping():
    return "ok"


logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # as `newsletter serve` does
port, processes, threads = map(int, sys.argv[1:4])
sock = listen("127.0.0.1", port)
if processes > 1:
    serve_forked(app, sock, processes, threads)
else:
    serve(app, sockets=[sock], threads=threads, _quiet=True, **WAITRESS_OPTIONS)
"""

MODES = {
    "clients": "many clients behind one trusted proxy ([web] trusted_proxies = 1), default rate limit",
    "shipped": "the app's defaults, every request from one client",
}


@dataclass
class WrkResult:
    target: str
    requests: int = 0
    seconds: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)
    errors: str = ""
    p50_ms: float = 0.0
    p99_ms: float = 0.0

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def non_2xx(self) -> dict[int, int]:
        return {code: count for code, count in sorted(self.statuses.items()) if not 200 <= code < 300}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_wrk(
    wrk: str,
    script: Path,
    url: str,
    args: argparse.Namespace,
    seconds: float,
    prefix: str,
    run: int,
    mode: str,
    target: str,
    stamp: str = "",
) -> WrkResult:
    command = [
        wrk,
        f"-t{args.wrk_threads}",
        f"-c{args.connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
        "--",
        prefix,
        str(run),
        mode,
        stamp,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise BenchError(f"wrk failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()[-400:]}")
    result = WrkResult(target)
    for line in done.stdout.splitlines():
        if not line.startswith("BENCH "):
            continue
        parts = line.split()
        if parts[1] == "status":
            result.statuses[int(parts[2])] = int(parts[3])
        elif parts[1] == "requests":
            result.requests = int(parts[2])
        elif parts[1] == "duration_us":
            result.seconds = int(parts[2]) / 1e6
        elif parts[1] == "errors":
            result.errors = " ".join(parts[2:])
        elif parts[1] == "latency_p50_ms":
            result.p50_ms = float(parts[2])
        elif parts[1] == "latency_p99_ms":
            result.p99_ms = float(parts[2])
    if not result.seconds:
        raise BenchError(f"could not read wrk's results: {done.stdout.strip()[-400:]}")
    return result


def count(url: str, table: str, column: str, prefix: str) -> int:
    from sqlalchemy import text

    from newsletter.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return (
                conn.execute(
                    text(f"SELECT count(*) FROM {table} WHERE {column} LIKE :p"), {"p": f"{prefix}-%"}
                ).scalar()
                or 0
            )
    finally:
        engine.dispose()


def drain(config: Path) -> tuple[int, float]:
    """Run the worker's sign-up step on everything logged; returns (sign-ups recorded, seconds)."""
    from newsletter.config import load_config
    from newsletter.runtime import Newsletter
    from newsletter.signups import process_signups

    nl = Newsletter(load_config(config))
    try:
        started = time.perf_counter()
        recorded = process_signups(nl)
        return recorded, time.perf_counter() - started
    finally:
        nl.engine.dispose()


class Site:
    """`newsletter serve --no-worker` on a fresh database."""

    def __init__(self, cmd: list[str], folder: Path, name: str, url: str, mode: str, args: argparse.Namespace):
        self.url = url
        self.config = benchkit.write_config(folder / f"{name}.toml", url, benchkit.free_port())
        if mode == "clients":
            with open(self.config, "a", encoding="utf-8") as handle:
                handle.write("\n[web]\ntrusted_proxies = 1\n")
        run_checked([*cmd, "--config", str(self.config), "db", "upgrade"], "newsletter db upgrade")
        self.port = benchkit.free_port()
        self.log = open(folder / f"{name}.log", "wb")
        self.proc = start(
            [
                *cmd,
                "--config",
                str(self.config),
                "serve",
                "--no-worker",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--processes",
                str(args.processes),
                "--threads",
                str(args.threads),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env(),
        )
        benchkit.wait_for_port(self.port, self.proc, what="newsletter serve")

    def stop(self) -> None:
        benchkit.stop_process(self.proc)
        self.log.close()


def serve_defaults() -> tuple[int, int]:
    """`newsletter serve`'s default --processes and --threads."""
    from newsletter.cli.site import serve

    defaults = {param.name: param.default for param in serve.params}
    return int(defaults["processes"]), int(defaults["threads"])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10, help="seconds of each measured wrk run (default 10)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--wrk-threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument(
        "--processes", type=int, default=0, help="web processes of both servers (default: `newsletter serve`'s default)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="waitress threads per process of both servers (default: `newsletter serve`'s default)",
    )
    parser.add_argument("--warmup", type=float, default=2, help="seconds of warm-up per server (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="measured runs per server, alternating (default 3)")
    parser.add_argument(
        "--mode", choices=(*MODES, "both"), default="both", help="clients (judged), shipped, or both (default)"
    )
    parser.add_argument("--database", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="sample `newsletter serve` (all its processes) with py-spy during the first measured "
        "run of the first case into FILE (collapsed stacks) and print the top functions",
    )
    parser.add_argument(
        "--profile-mode",
        choices=("gil", "active", "wall"),
        default="gil",
        help="gil: only the thread holding the GIL (default); active: running threads; "
        "wall: every thread, waiting or not",
    )
    args = parser.parse_args()
    if (
        args.duration <= 0
        or args.connections < 1
        or not 1 <= args.repeat <= 50
        or args.processes < 0
        or args.threads < 0
    ):
        parser.error("--duration, --connections and --repeat (at most 50) must be positive")

    benchkit.install_cleanup()
    try:
        return run(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped and temporary files removed", file=sys.stderr)
        return 130
    finally:
        benchkit.cleanup()


def form_stamp(port: int) -> str:
    """The signed timestamp of the subscribe page, old enough for [web] min_fill_seconds (default 2): every
    request of a run sends it, as a reader who opened the page and typed would."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
        found = re.search(r'name="started" value="([^"]+)"', page.read().decode())
    assert found, "the subscribe page has no form timestamp"
    time.sleep(2.5)
    return found.group(1)


def run(args: argparse.Namespace) -> int:
    wrk = benchkit.need_tool("wrk", "wrk", "HTTP load generator")
    pyspy = benchkit.find_pyspy() if args.profile else None
    cmd = benchkit.newsletter_command()
    processes, threads = serve_defaults()
    args.processes, args.threads = args.processes or processes, args.threads or threads
    folder = benchkit.temp_dir("newsletter-bench-subscribe-")
    script = folder / "unique-post.lua"
    script.write_text(WRK_SCRIPT, encoding="utf-8")
    ping_app = folder / "ping_app.py"
    ping_app.write_text(PING_APP, encoding="utf-8")

    ping_port = benchkit.free_port()
    ping_log = open(folder / "ping.log", "wb")
    ping = start(
        [sys.executable, str(ping_app), str(ping_port), str(args.processes), str(args.threads)],
        stdout=ping_log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=child_env(),
    )
    benchkit.wait_for_port(ping_port, ping, what="the trivial Flask app")
    ping_url = f"http://127.0.0.1:{ping_port}/ping"
    if args.warmup > 0:
        log(f"warm-up of the trivial app: {args.warmup:g} s")
        run_wrk(wrk, script, ping_url, args, args.warmup, "warmup", 0, "clients", "ping")

    databases = ["sqlite", "postgresql"] if args.database == "both" else [args.database]
    modes = list(MODES) if args.mode == "both" else [args.mode]
    pg = None
    failed = False
    outcomes: list[tuple[str, str, float]] = []
    profiled = False
    case = 0
    for database in databases:
        if database == "postgresql" and pg is None:
            benchkit.need_python("psycopg", "psycopg[binary]>=3.1")
            pg = benchkit.PostgresCluster()
            pg.start()
        for mode in modes:
            case += 1
            name = f"{database}-{mode}"
            url = (
                f"sqlite:///{folder / f'{name}.db'}"
                if database == "sqlite"
                else pg.create_database(f"bench_subscribe_{case}")
            )  # type: ignore[union-attr]
            site = Site(cmd, folder, name, url, mode, args)
            subscribe_url = f"http://127.0.0.1:{site.port}/subscribe"
            stamp = form_stamp(site.port)
            if args.warmup > 0:
                log(f"{name}: warm-up of POST /subscribe: {args.warmup:g} s")
                run_wrk(wrk, script, subscribe_url, args, args.warmup, "warmup", 0, mode, "subscribe", stamp)
            subscribe_runs: list[WrkResult] = []
            ping_runs: list[WrkResult] = []
            for repeat in range(1, args.repeat + 1):
                prefix = f"run{repeat}"
                sampler = None
                if pyspy and not profiled:
                    profiled = True
                    sampler = start(
                        [
                            pyspy,
                            "record",
                            "--pid",
                            str(site.proc.pid),
                            "--subprocesses",
                            "--duration",
                            str(max(1, int(args.duration))),
                            "--format",
                            "raw",
                            "--nolineno",
                            "--rate",
                            "200",
                            *{"gil": ["--gil"], "wall": ["--idle"]}.get(args.profile_mode, []),
                            "--output",
                            str(Path(args.profile).resolve()),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        stdin=subprocess.DEVNULL,
                    )
                log(f"{name}: run {repeat}: wrk POST /subscribe for {args.duration:g} s")
                subscribe_runs.append(
                    run_wrk(
                        wrk, script, subscribe_url, args, args.duration, prefix, repeat, mode, "POST /subscribe", stamp
                    )
                )
                if sampler is not None:
                    try:
                        sampler.wait(30)
                    finally:
                        benchkit.stop_process(sampler)
                    if sampler.returncode != 0:
                        raise BenchError(
                            f"py-spy failed: {sampler.stderr.read().decode(errors='replace').strip()[-400:]}"
                        )
                log(f"{name}: run {repeat}: wrk POST /ping for {args.duration:g} s")
                ping_runs.append(
                    run_wrk(wrk, script, ping_url, args, args.duration, prefix, repeat, mode, "POST /ping")
                )
            if ping.poll() is not None or site.proc.poll() is not None:
                raise BenchError("a server exited during the run")
            time.sleep(1.0)  # let the requests in flight when wrk stopped finish
            site.stop()
            failed |= report(name, mode, database, args, subscribe_runs, ping_runs, site, outcomes)

    if pg is not None:
        pg.stop()
    judged = [(database, ratio) for database, mode, ratio in outcomes if mode == "clients"]
    if judged:
        print()
        for database, ratio in judged:
            print(
                f"target: POST /subscribe >= 0.5 x the trivial endpoint ({database}, many clients): {ratio:.2f}x "
                f"{'ok' if ratio >= 0.5 else 'MISSED'}"
            )
    if args.profile:
        print(f"\nprofile of `newsletter serve` during the first measured run ({args.profile}):")
        print(benchkit.summarize_profile(Path(args.profile), args.profile_mode))
    return 1 if failed else 0


def report(
    name: str,
    mode: str,
    database: str,
    args: argparse.Namespace,
    subscribe_runs: list[WrkResult],
    ping_runs: list[WrkResult],
    site: Site,
    outcomes: list[tuple[str, str, float]],
) -> bool:
    """Print one case's table and checks; True when a check failed."""
    failed = False
    print(f"\n== {name}: {MODES[mode]}")
    print(
        f"both servers: newsletter.serving, {args.processes} process(es) x {args.threads} waitress thread(s); "
        f"wrk -t{args.wrk_threads} -c{args.connections} -d{args.duration:g}s; {args.warmup:g} s warm-up each"
    )
    header = f"{'run':>3} {'endpoint':<16} {'requests':>9} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7}  non-2xx / errors"
    print(header)
    print("-" * len(header))
    for repeat, (sub, png) in enumerate(zip(subscribe_runs, ping_runs, strict=True), 1):
        for r in (sub, png):
            bad = ", ".join(f"{code}: {count}" for code, count in r.non_2xx.items()) or "none"
            print(
                f"{repeat:>3} {r.target:<16} {r.requests:>9,} {r.rate:>8,.0f} {r.p50_ms:>7.1f} {r.p99_ms:>7.1f}  "
                f"{bad}; {r.errors}"
            )
    ratios = [s.rate / p.rate for s, p in zip(subscribe_runs, ping_runs, strict=True) if p.rate]
    ratio = statistics.median(ratios) if ratios else 0.0
    print(
        f"POST /subscribe {statistics.median(r.rate for r in subscribe_runs):,.0f} req/s, trivial endpoint "
        f"{statistics.median(r.rate for r in ping_runs):,.0f} req/s (medians); ratio {ratio:.2f}"
        + (f" (per run: {', '.join(f'{x:.2f}' for x in ratios)})" if len(ratios) > 1 else "")
    )

    logged = 0
    for repeat, sub in enumerate(subscribe_runs, 1):
        stored = count(site.url, "signups", "email", f"run{repeat}")
        logged += stored
        oks = sub.statuses.get(200, 0)
        extra = stored - oks
        if extra == 0:
            print(f"run {repeat}: {stored:,} sign-ups logged = {oks:,} 200 responses: ok")
        elif 0 < extra <= args.connections:
            print(
                f"run {repeat}: {stored:,} sign-ups logged, {oks:,} 200 responses: ok ({extra} request(s) were "
                "in flight when wrk stopped; the server completed them)"
            )
        else:
            print(f"run {repeat}: {stored:,} sign-ups logged but {oks:,} 200 responses: MISMATCH")
            failed = True
    recorded, seconds = drain(site.config)
    subscribers = sum(
        count(site.url, "subscribers", "email_key", f"run{repeat}") for repeat in range(1, len(subscribe_runs) + 1)
    )
    rate = f" ({recorded / seconds:,.0f}/s)" if seconds and recorded else ""
    verdict = "ok" if subscribers == logged else "MISMATCH"
    failed |= verdict != "ok"
    print(
        f"worker: {recorded:,} sign-ups (with the warm-up's) made into subscribers and confirmation emails in "
        f"{seconds:.1f} s{rate}; {subscribers:,} subscribers for the {logged:,} measured sign-ups: {verdict}"
    )

    limited = sum(r.statuses.get(429, 0) for r in subscribe_runs)
    other = sum(count for r in subscribe_runs for code, count in r.non_2xx.items() if code != 429)
    if limited:
        print(
            f"RATE-LIMITED: {limited:,} requests answered 429 Too Many Requests"
            + ("" if mode == "shipped" else " (must be 0 when every request comes from a new client)")
        )
        failed |= mode != "shipped"
    if other:
        print(f"MISSED: {other:,} non-2xx responses other than 429 to POST /subscribe (must be 0)")
        failed = True
    if not other and (mode == "shipped" or not limited):
        outcomes.append((database, mode, ratio))
    return failed


if __name__ == "__main__":
    sys.exit(main())
