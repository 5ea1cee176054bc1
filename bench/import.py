#!/usr/bin/env python3
"""Benchmark `newsletter subscribers import` of a large file while readers sign up on the web form.

    python bench/import.py                                  # 100,000 rows, SQLite and PostgreSQL
    python bench/import.py --rows 1000000 --database sqlite
    python bench/import.py --clients 4 --repeat 3

For each database: a fresh database (`newsletter db upgrade`), a CSV of N new addresses (`email` only, so
every row is imported as confirmed), and `newsletter serve --no-worker` with its default processes and
threads behind one trusted proxy ([web] trusted_proxies = 1), so that every sign-up comes from a client
of its own, as readers' sign-ups do. First the sign-up clients alone post to /subscribe for --idle seconds
(the latency of an idle site); then `newsletter subscribers import FILE` runs as its own process, as a
user would run it, while the same clients keep posting, one request at a time each, until it ends.

Measured: the import's wall time (start-up included) and rows a second, and every sign-up's latency
during it next to the idle figures. Checked: the import's summary line says N imported, every sign-up got
200, and the sign-up log holds one row for each of them.

Installs PostgreSQL with apt-get and psycopg with pip when missing. Servers and temporary files are removed
on exit and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchkit
from benchkit import BenchError, child_env, run_checked, start

SUMMARY = re.compile(r"imported ([\d,]+); already there ([\d,]+); refused ([\d,]+)")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Run:
    database: str
    rows: int
    repeat: int
    import_s: float = 0.0
    idle_ms: list[float] = field(default_factory=list)
    during_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.rows / self.import_s if self.import_s else 0.0


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def write_readers(path: Path, rows: int) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("email\n")
        for i in range(rows):
            handle.write(f"reader{i:07d}@example.com\n")


def form_stamp(port: int) -> str:
    """The subscribe page's signed timestamp, once old enough for [web] min_fill_seconds (default 2)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as page:
        found = re.search(r'name="started" value="([^"]+)"', page.read().decode())
    if not found:
        raise BenchError("the subscribe page has no form timestamp")
    time.sleep(2.5)
    return found.group(1)


class Clients:
    """Sign-up clients, each posting one new reader's form after another from an address of its own."""

    def __init__(self, port: int, stamp: str, clients: int) -> None:
        self.url, self.stamp, self.clients = f"http://127.0.0.1:{port}/subscribe", stamp, clients
        self.sent = 0
        self.lock = threading.Lock()

    def run_while(self, running, latencies: list[float], failures: list[str]) -> None:
        """Post sign-ups until RUNNING() is false; each one's latency in ms goes to LATENCIES."""
        threads = [
            threading.Thread(target=self._client, args=(running, latencies, failures), daemon=True)
            for _ in range(self.clients)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _next(self) -> int:
        with self.lock:
            self.sent += 1
            return self.sent

    def _client(self, running, latencies: list[float], failures: list[str]) -> None:
        while running():
            n = self._next()
            body = urllib.parse.urlencode({"email": f"web{n}@example.com", "website": "", "started": self.stamp})
            request = urllib.request.Request(
                self.url,
                data=body.encode(),
                headers={"X-Forwarded-For": f"10.{n // 62500 % 256}.{n // 250 % 250}.{n % 250 + 1}"},
            )
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    response.read()
                    status = response.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            except OSError as exc:
                failures.append(f"sign-up {n}: {exc}")
                continue
            latencies.append((time.perf_counter() - started) * 1000)
            if status != 200:
                failures.append(f"sign-up {n}: HTTP {status}")


def count(url: str, table: str) -> int:
    from sqlalchemy import text

    from newsletter.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(f"SELECT count(*) FROM {table}")).scalar() or 0
    finally:
        engine.dispose()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cmd = benchkit.newsletter_command()
        self.pg: benchkit.PostgresCluster | None = None

    def postgres(self) -> benchkit.PostgresCluster:
        if self.pg is None:
            benchkit.need_python("psycopg", "psycopg[binary]")
            log("starting a throwaway PostgreSQL cluster")
            self.pg = benchkit.PostgresCluster()
            self.pg.start()
        return self.pg

    def run(self, database: str, repeat: int, readers: Path) -> Run:
        result = Run(database, self.args.rows, repeat)
        folder = benchkit.temp_dir(f"newsletter-bench-import-{database}-")
        pg_name = f"bench_import_{repeat}"
        url = (
            f"sqlite:///{folder / 'newsletter.db'}"
            if database == "sqlite"
            else self.postgres().create_database(pg_name)
        )
        try:
            self._run(result, folder, url, readers)
        finally:
            if database == "postgresql" and self.pg is not None:
                self.pg.drop_database(pg_name)
        return result

    def _run(self, result: Run, folder: Path, url: str, readers: Path) -> None:
        label = f"{result.database}" + (f" (run {result.repeat})" if self.args.repeat > 1 else "")
        config = benchkit.write_config(folder / "config.toml", url, benchkit.free_port())
        with open(config, "a", encoding="utf-8") as handle:
            handle.write("\n[web]\ntrusted_proxies = 1\n")
        newsletter = [*self.cmd, "--config", str(config)]
        run_checked([*newsletter, "db", "upgrade"], "newsletter db upgrade")
        port = benchkit.free_port()
        with open(folder / "serve.log", "wb") as serve_log:
            serve = start(
                [*newsletter, "serve", "--no-worker", "--host", "127.0.0.1", "--port", str(port)],
                stdout=serve_log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=child_env(),
            )
            benchkit.wait_for_port(port, serve, what="newsletter serve")
            clients = Clients(port, form_stamp(port), self.args.clients)

            log(f"{label}: {self.args.clients} sign-up client(s) alone for {self.args.idle:g} s")
            until = time.monotonic() + self.args.idle
            clients.run_while(lambda: time.monotonic() < until, result.idle_ms, result.failures)

            log(f"{label}: newsletter subscribers import of {result.rows:,} rows, the clients still signing up")
            out, err = folder / "import.out", folder / "import.err"
            with open(out, "wb") as stdout, open(err, "wb") as stderr:
                started = time.perf_counter()
                process = start(
                    [*newsletter, "subscribers", "import", str(readers)],
                    stdout=stdout,
                    stderr=stderr,
                    stdin=subprocess.DEVNULL,
                    env=child_env(),
                )
                clients.run_while(lambda: process.poll() is None, result.during_ms, result.failures)
                process.wait(self.args.timeout)
                result.import_s = time.perf_counter() - started
                benchkit.forget(process)
            benchkit.stop_process(serve)
        output = out.read_text(errors="replace")
        if process.returncode != 0:
            raise BenchError(f"the import exited with status {process.returncode}: {err.read_text().strip()[-600:]}")
        summary = SUMMARY.search(output)
        if not summary or int(summary.group(1).replace(",", "")) != result.rows:
            raise BenchError(f"the import's summary does not say {result.rows:,} imported: {output.strip()[-300:]!r}")
        logged = count(url, "signups")
        answered = len(result.idle_ms) + len(result.during_ms)
        if logged != answered:
            result.failures.append(f"{logged:,} sign-ups logged for {answered:,} answered")
        log(
            f"{label}: imported in {result.import_s:.1f} s ({result.rate:,.0f} rows/s); worst sign-up during it "
            f"{max(result.during_ms, default=0):.0f} ms of {len(result.during_ms):,}"
        )


def report(runs: list[Run], args: argparse.Namespace) -> bool:
    """Print the table and the checks; True when a check failed."""
    print()
    print(
        f"import of {args.rows:,} new addresses; {args.clients} sign-up client(s), one request at a time each; "
        f"latencies in ms"
    )
    header = (
        f"{'database':<10} {'rows':>9} {'import s':>8} {'rows/s':>8} {'sign-ups':>8} {'p50':>6} {'p99':>6} "
        f"{'worst':>6}  {'idle p50':>8} {'idle worst':>10}"
    )
    print(header)
    print("-" * len(header))
    failed = False
    for r in runs:
        print(
            f"{r.database:<10} {r.rows:>9,} {r.import_s:>8.1f} {r.rate:>8,.0f} {len(r.during_ms):>8,} "
            f"{percentile(r.during_ms, 50):>6.1f} {percentile(r.during_ms, 99):>6.1f} "
            f"{max(r.during_ms, default=0):>6.1f}"
            f"  {percentile(r.idle_ms, 50):>8.1f} {max(r.idle_ms, default=0):>10.1f}"
        )
        for failure in r.failures[:5]:
            print(f"  FAILED: {failure}")
        failed |= bool(r.failures)
    print("\ntargets:")
    for r in runs:
        worst = max(r.during_ms, default=0) / 1000
        print(
            f"  {r.database}: every sign-up during the import answered 200 within a second: "
            f"{'ok' if worst < 1 and not r.failures else 'MISSED'} (worst {worst:.2f} s); "
            f"import {r.import_s:.1f} s"
        )
        failed |= worst >= 1
    for database in dict.fromkeys(r.database for r in runs):
        rates = [r.rate for r in runs if r.database == database]
        if len(rates) > 1:
            print(f"  {database}: median {statistics.median(rates):,.0f} rows/s over {len(rates)} runs")
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000, help="rows in the file (default 100000)")
    parser.add_argument("--database", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each database (default 1)")
    parser.add_argument("--clients", type=int, default=2, help="sign-up clients (default 2)")
    parser.add_argument("--idle", type=float, default=3, help="seconds of sign-ups before the import (default 3)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before the import is given up")
    args = parser.parse_args()
    if args.rows < 1 or args.repeat < 1 or args.clients < 1:
        parser.error("--rows, --repeat and --clients must be at least 1")
    databases = ["sqlite", "postgresql"] if args.database == "both" else [args.database]

    benchkit.install_cleanup()
    runs: list[Run] = []
    try:
        bench = Bench(args)
        readers = benchkit.temp_dir("newsletter-bench-import-") / "readers.csv"
        write_readers(readers, args.rows)
        for database in databases:
            for repeat in range(1, args.repeat + 1):
                runs.append(bench.run(database, repeat, readers))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if runs:
            report(runs, args)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped and temporary files removed", file=sys.stderr)
        if runs:
            report(runs, args)
        return 130
    finally:
        benchkit.cleanup()
    return 1 if report(runs, args) else 0


if __name__ == "__main__":
    sys.exit(main())
