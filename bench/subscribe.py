#!/usr/bin/env python3
"""Benchmark POST /subscribe under `newsletter serve` against a trivial Flask endpoint, both on waitress.

    python bench/subscribe.py [--duration 10] [--connections 32] [--threads 8] [--repeat 1] [--limits both]

Starts `newsletter serve --no-worker` (SQLite, fresh database) and, in another process, a Flask app whose
only route is /ping -> "ok", served by waitress with the same number of threads. wrk drives both with the
same Lua script: every request is a POST with a form-encoded, unique address (`email=run-tT-N@...`),
so every sign-up is a new subscriber with a confirmation email queued in the outbox. Prints both request
rates, their ratio, latency percentiles and every non-2xx status: there must be none for /subscribe, and
429s (the app rate-limits) are called out, since all of wrk's requests come from one client address.
Afterwards the database must hold as many new subscribers as there were 200 responses (up to the requests
still in flight when wrk stopped, which the server completes).

--limits shipped runs the app as configured by default; --limits lifted sets [web] rate_limit out of reach
(when the app has that key), so that every request is a real sign-up; both (the default) runs the two, each
on its own fresh database, and judges the target on the last one.

Installs wrk with apt-get if it is missing. Servers and temporary files are removed on exit and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchkit  # noqa: E402
from benchkit import BenchError, child_env, run_checked, start  # noqa: E402

WRK_SCRIPT = r"""
-- One unique address per request: run prefix, wrk thread number, per-thread counter.
local threads = {}
local counter = 0
statuses = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  prefix = args[1] or "run"
end

function request()
  counter = counter + 1
  local body = "email=" .. prefix .. "-t" .. tid .. "-" .. counter .. "%40example.com"
  return wrk.format("POST", nil, {["Content-Type"] = "application/x-www-form-urlencoded"}, body)
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
import sys

from flask import Flask
from waitress import serve

app = Flask(__name__)


@app.route("/ping", methods=["GET", "POST"])
def ping():
    return "ok"


serve(app, host="127.0.0.1", port=int(sys.argv[1]), threads=int(sys.argv[2]), _quiet=True)
"""


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
    def ok(self) -> int:
        return sum(count for code, count in self.statuses.items() if 200 <= code < 300)

    @property
    def non_2xx(self) -> dict[int, int]:
        return {code: count for code, count in sorted(self.statuses.items()) if not 200 <= code < 300}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_wrk(wrk: str, script: Path, url: str, args: argparse.Namespace, seconds: float, prefix: str,
            target: str) -> WrkResult:
    command = [wrk, f"-t{args.wrk_threads}", f"-c{args.connections}", f"-d{seconds:g}s", "--timeout", "10s",
               "-s", str(script), url, "--", prefix]
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


def count_subscribers(url: str, prefix: str) -> int:
    from sqlalchemy import text

    from newsletter.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM subscribers WHERE email_key LIKE :p"),
                                {"p": f"{prefix}-%"}).scalar() or 0
    finally:
        engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10, help="seconds of each measured wrk run (default 10)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    parser.add_argument("--wrk-threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--threads", type=int, default=8,
                        help="waitress threads of both servers (default 8, `newsletter serve`'s default)")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of warm-up per server (default 2)")
    parser.add_argument("--repeat", type=int, default=1, help="measured runs per server, alternating (default 1)")
    parser.add_argument("--limits", choices=("shipped", "lifted", "both"), default="both",
                        help="shipped: the app's default per-client rate limit (one client address: expect 429s); "
                             "lifted: [web] rate_limit set out of reach, so every request is a sign-up; "
                             "both (default)")
    parser.add_argument("--profile", metavar="FILE",
                        help="sample `newsletter serve` with py-spy during the first measured run (of the lifted "
                             "mode, if run) into FILE "
                             "(collapsed stacks) and print the top functions")
    parser.add_argument("--profile-mode", choices=("gil", "active", "wall"), default="gil",
                        help="gil: only the thread holding the GIL (default); active: running threads; "
                             "wall: every thread, waiting or not")
    args = parser.parse_args()
    if args.duration <= 0 or args.connections < 1 or args.repeat < 1 or args.threads < 1:
        parser.error("--duration, --connections, --threads and --repeat must be positive")

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


def web_settings() -> dict[str, str] | None:
    """[web] keys that lift the per-client rate limit, if this version of the app has one."""
    from dataclasses import fields

    from newsletter import config

    sections = getattr(config, "SECTIONS", {})
    if "web" not in sections:
        return None
    names = {f.name for f in fields(sections["web"]())}
    return {"rate_limit": "1000000 per second"} if "rate_limit" in names else None


def write_site_config(path: Path, url: str, web: dict[str, str] | None) -> Path:
    benchkit.write_config(path, url, benchkit.free_port())
    if web:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write("\n[web]\n" + "".join(f'{key} = "{value}"\n' for key, value in web.items()))
    return path


class Site:
    """`newsletter serve --no-worker` on a fresh SQLite database."""

    def __init__(self, cmd: list[str], folder: Path, name: str, web: dict[str, str] | None,
                 threads: int) -> None:
        self.url = f"sqlite:///{folder / f'{name}.db'}"
        config = write_site_config(folder / f"{name}.toml", self.url, web)
        run_checked([*cmd, "--config", str(config), "db", "upgrade"], "newsletter db upgrade")
        self.port = benchkit.free_port()
        self.log = open(folder / f"{name}.log", "wb")
        self.proc = start([*cmd, "--config", str(config), "serve", "--no-worker", "--host", "127.0.0.1",
                           "--port", str(self.port), "--threads", str(threads)],
                          stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env())
        benchkit.wait_for_port(self.port, self.proc, what="newsletter serve")

    def stop(self) -> None:
        benchkit.stop_process(self.proc)
        self.log.close()


def run(args: argparse.Namespace) -> int:
    wrk = benchkit.need_tool("wrk", "wrk", "HTTP load generator")
    pyspy = benchkit.find_pyspy() if args.profile else None
    cmd = benchkit.newsletter_command()
    folder = benchkit.temp_dir("newsletter-bench-subscribe-")
    script = folder / "unique-post.lua"
    script.write_text(WRK_SCRIPT, encoding="utf-8")
    ping_app = folder / "ping_app.py"
    ping_app.write_text(PING_APP, encoding="utf-8")

    lift = web_settings()
    modes = ["shipped", "lifted"] if args.limits == "both" else [args.limits]
    if lift is None and "lifted" in modes:
        print("note: this version of the app has no [web] rate_limit: nothing to lift", file=sys.stderr)
        modes = ["shipped"]

    ping_port = benchkit.free_port()
    ping_log = open(folder / "ping.log", "wb")
    ping = start([sys.executable, str(ping_app), str(ping_port), str(args.threads)],
                 stdout=ping_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=child_env())
    benchkit.wait_for_port(ping_port, ping, what="the trivial Flask app")
    ping_url = f"http://127.0.0.1:{ping_port}/ping"
    if args.warmup > 0:
        log(f"warm-up of the trivial app: {args.warmup:g} s")
        run_wrk(wrk, script, ping_url, args, args.warmup, "warmup", "ping")

    failed = False
    outcomes: list[tuple[str, float]] = []
    profiled = False
    for mode in modes:
        web = lift if mode == "lifted" else None
        site = Site(cmd, folder, f"site-{mode}", web, args.threads)
        subscribe_url = f"http://127.0.0.1:{site.port}/subscribe"
        if args.warmup > 0:
            log(f"{mode}: warm-up of POST /subscribe: {args.warmup:g} s")
            run_wrk(wrk, script, subscribe_url, args, args.warmup, "warmup", "subscribe")
        subscribe_runs: list[WrkResult] = []
        ping_runs: list[WrkResult] = []
        checks: list[str] = []
        for repeat in range(1, args.repeat + 1):
            prefix = f"run{repeat}"
            sampler = None
            if pyspy and not profiled and (mode == "lifted" or len(modes) == 1):
                profiled = True
                sampler = start([pyspy, "record", "--pid", str(site.proc.pid),
                                 "--duration", str(max(1, int(args.duration))),
                                 "--format", "raw", "--nolineno", "--rate", "200",
                                 *{"gil": ["--gil"], "wall": ["--idle"]}.get(args.profile_mode, []),
                                 "--output", str(Path(args.profile).resolve())],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
            log(f"{mode}: run {repeat}: wrk POST /subscribe for {args.duration:g} s")
            sub = run_wrk(wrk, script, subscribe_url, args, args.duration, prefix, "POST /subscribe")
            if sampler is not None:
                try:
                    sampler.wait(30)
                finally:
                    benchkit.stop_process(sampler)
                if sampler.returncode != 0:
                    raise BenchError(f"py-spy failed: {sampler.stderr.read().decode(errors='replace').strip()[-400:]}")
            time.sleep(1.0)  # let the requests in flight when wrk stopped finish
            stored = count_subscribers(site.url, prefix)
            oks = sub.statuses.get(200, 0)
            in_flight = stored - oks
            if in_flight == 0:
                checks.append(f"run {repeat}: {stored:,} new subscribers in the database = {oks:,} 200 responses: ok")
            elif 0 < in_flight <= args.connections:
                checks.append(f"run {repeat}: {stored:,} new subscribers in the database, {oks:,} 200 responses: "
                              f"ok ({in_flight} request(s) were still in flight when wrk stopped; the server "
                              "completed them)")
            else:
                checks.append(f"run {repeat}: {stored:,} new subscribers in the database but {oks:,} 200 "
                              "responses: MISMATCH")
                failed = True
            subscribe_runs.append(sub)
            log(f"{mode}: run {repeat}: wrk POST /ping for {args.duration:g} s")
            ping_runs.append(run_wrk(wrk, script, ping_url, args, args.duration, prefix, "POST /ping"))
        for proc in (site.proc, ping):
            if proc.poll() is not None:
                raise BenchError(f"a server exited during the run (status {proc.returncode})")
        site.stop()
        failed |= print_mode(mode, web, args, subscribe_runs, ping_runs, checks, outcomes)

    if outcomes:
        mode, ratio = outcomes[-1]
        print(f"\ntarget: POST /subscribe >= 0.5 x the trivial endpoint ({mode} limits): {ratio:.2f}x "
              f"{'ok' if ratio >= 0.5 else 'MISSED'}")
    if args.profile:
        print(f"\nprofile of `newsletter serve` during the first measured run ({args.profile}):")
        print(benchkit.summarize_profile(Path(args.profile), args.profile_mode))
    return 1 if failed else 0


def print_mode(mode: str, web: dict[str, str] | None, args: argparse.Namespace, subscribe_runs: list[WrkResult],
               ping_runs: list[WrkResult], checks: list[str], outcomes: list[tuple[str, float]]) -> bool:
    """Print one mode's table and checks; True when a check failed."""
    failed = False
    setting = ("the app's default limits" if web is None else
               "per-client rate limit lifted: " + ", ".join(f"[web] {k} = \"{v}\"" for k, v in web.items()))
    print(f"\n== {mode}: {setting}")
    print(f"waitress threads {args.threads} on both servers; wrk -t{args.wrk_threads} -c{args.connections} "
          f"-d{args.duration:g}s; SQLite; {args.warmup:g} s warm-up each")
    header = f"{'run':>3} {'endpoint':<16} {'requests':>9} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7}  non-2xx / errors"
    print(header)
    print("-" * len(header))
    for repeat, (sub, png) in enumerate(zip(subscribe_runs, ping_runs), 1):
        for r in (sub, png):
            bad = ", ".join(f"{code}: {count}" for code, count in r.non_2xx.items()) or "none"
            print(f"{repeat:>3} {r.target:<16} {r.requests:>9,} {r.rate:>8,.0f} {r.p50_ms:>7.1f} {r.p99_ms:>7.1f}  "
                  f"{bad}; {r.errors}")
    ratios = [s.rate / p.rate for s, p in zip(subscribe_runs, ping_runs) if p.rate]
    ratio = statistics.median(ratios) if ratios else 0.0
    print(f"POST /subscribe {statistics.median(r.rate for r in subscribe_runs):,.0f} req/s, trivial endpoint "
          f"{statistics.median(r.rate for r in ping_runs):,.0f} req/s (medians); ratio {ratio:.2f}"
          + (f" (per run: {', '.join(f'{x:.2f}' for x in ratios)})" if len(ratios) > 1 else ""))
    for check in checks:
        print(check)
    limited = sum(r.statuses.get(429, 0) for r in subscribe_runs)
    other = sum(count for r in subscribe_runs for code, count in r.non_2xx.items() if code != 429)
    if limited:
        print(f"RATE-LIMITED: the app answered {limited:,} sign-ups with 429 Too Many Requests. All requests come "
              "from one client address, so this measures the limiter's refusals, not sign-ups"
              + ("; the lifted run measures sign-ups" if mode == "shipped" else ""))
        if mode != "shipped":
            failed = True
    if other:
        print(f"MISSED: {other:,} non-2xx responses other than 429 to POST /subscribe (must be 0)")
        failed = True
    if not limited and not other:
        print("non-2xx responses to POST /subscribe: 0")
        outcomes.append((mode, ratio))
    return failed


if __name__ == "__main__":
    sys.exit(main())
