"""Shared helpers for the benchmark scripts: tools, ports, child processes, throwaway servers, cleanup.

Everything a script starts is registered here and stopped on exit, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import atexit
import glob
import importlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's package, ahead of any installed copy

_processes: list[subprocess.Popen] = []
_cleanups: list = []


class BenchError(Exception):
    """A problem that ends the benchmark with one clear message."""


# ---- cleanup --------------------------------------------------------------------------------------


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def install_cleanup() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    atexit.register(cleanup)


def on_cleanup(func) -> None:
    """Run FUNC at exit (last registered runs first)."""
    _cleanups.append(func)


def cleanup() -> None:
    while _processes:
        stop_process(_processes[-1])
    while _cleanups:
        func = _cleanups.pop()
        try:
            func()
        except Exception as exc:
            print(f"cleanup: {exc}", file=sys.stderr)


def start(args: list[str], **kwargs) -> subprocess.Popen:
    """Start a child process that cleanup() stops."""
    try:
        proc = subprocess.Popen(args, **kwargs)
    except FileNotFoundError:
        raise BenchError(f"cannot run {args[0]}: not found") from None
    _processes.append(proc)
    return proc


def forget(proc: subprocess.Popen) -> None:
    if proc in _processes:
        _processes.remove(proc)


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Terminate PROC (only that process), then kill it if it does not end."""
    forget(proc)
    if proc.returncode is None and proc.poll() is None:
        try:
            proc.terminate()
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        except ProcessLookupError:
            pass


def temp_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    on_cleanup(lambda: shutil.rmtree(path, ignore_errors=True))
    return path


# ---- environment ----------------------------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    """The environment for the app's commands: this checkout first on PYTHONPATH, whatever copy of the
    project is installed; none of the user's NEWSLETTER_* overrides; plus EXTRA."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30.0, what: str = "server") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


def is_root() -> bool:
    return os.geteuid() == 0


def _apt_install(packages: list[str], preseed: str = "") -> str | None:
    """Install Debian packages; returns None on success, else why it failed."""
    if not shutil.which("apt-get"):
        return "apt-get is not available on this system"
    prefix: list[str] = []
    if not is_root():
        if not shutil.which("sudo"):
            return "not root and sudo is not available"
        prefix = ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print(f"installing {' '.join(packages)} with apt-get ...", file=sys.stderr, flush=True)
    if preseed:
        done = subprocess.run(
            [*prefix, "debconf-set-selections"], input=preseed, text=True, capture_output=True, env=env
        )
        if done.returncode != 0:
            return f"debconf-set-selections failed: {done.stderr.strip()[-300:]}"
    done = subprocess.run(
        [*prefix, "apt-get", "install", "-y", "-qq", *packages], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        update = subprocess.run([*prefix, "apt-get", "update", "-qq"], capture_output=True, text=True, env=env)
        if update.returncode == 0:
            done = subprocess.run(
                [*prefix, "apt-get", "install", "-y", "-qq", *packages], capture_output=True, text=True, env=env
            )
    if done.returncode != 0:
        return f"apt-get install {' '.join(packages)} failed: {(done.stderr or done.stdout).strip()[-400:]}"
    return None


def need_tool(path_or_name: str, package: str, purpose: str, preseed: str = "") -> str:
    """The path of a command, installing its Debian package if missing; BenchError if impossible."""

    def find() -> str | None:
        if os.sep in path_or_name:
            return path_or_name if os.access(path_or_name, os.X_OK) else None
        return shutil.which(path_or_name)

    found = find()
    if found:
        return found
    problem = _apt_install([package], preseed)
    found = find()
    if found:
        return found
    raise BenchError(
        f"{path_or_name} ({purpose}) is missing and could not be installed: "
        f"{problem or 'package installed but the command is still not there'}. "
        f"Install the Debian package '{package}' (or the tool by other means) and run again."
    )


def smtp_tools() -> tuple[str, str]:
    preseed = "postfix postfix/main_mailer_type select No configuration\n"
    sink = need_tool("/usr/sbin/smtp-sink", "postfix", "Postfix's SMTP test server", preseed)
    source = need_tool("/usr/sbin/smtp-source", "postfix", "Postfix's SMTP test client", preseed)
    return sink, source


def postgres_bindir() -> Path:
    def find() -> Path | None:
        found = sorted(
            glob.glob("/usr/lib/postgresql/*/bin/initdb"),
            key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0,
        )
        if found:
            return Path(found[-1]).parent
        initdb = shutil.which("initdb")
        return Path(initdb).parent if initdb else None

    bindir = find()
    if bindir:
        return bindir
    problem = _apt_install(["postgresql"])
    bindir = find()
    if bindir:
        return bindir
    raise BenchError(
        "PostgreSQL server binaries (initdb, pg_ctl) are missing and could not be installed: "
        f"{problem or 'not found after installing'}. Install the Debian package 'postgresql' "
        "or run with --database sqlite."
    )


def need_python(module: str, requirement: str) -> None:
    """Import MODULE, pip-installing REQUIREMENT into this interpreter if it is missing."""
    try:
        importlib.import_module(module)
        return
    except ImportError:
        pass
    print(f"installing {requirement} with pip ...", file=sys.stderr, flush=True)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", requirement],
        capture_output=True,
        text=True,
    )
    importlib.invalidate_caches()
    try:
        importlib.import_module(module)
    except ImportError:
        raise BenchError(
            f"Python package {requirement} is missing and pip could not install it: "
            f"{(done.stderr or done.stdout).strip()[-400:]}"
        ) from None


def _find_script() -> str | None:
    script = Path(sys.executable).parent / "newsletter"
    if script.is_file() and os.access(script, os.X_OK):
        return str(script)
    return shutil.which("newsletter")


def newsletter_command() -> list[str]:
    """The `newsletter` command, running this checkout's code (PYTHONPATH puts it ahead of any installed copy).

    Installs the project (pip install -e, as its README says) when the command or a dependency is missing.
    """
    problem = None
    try:
        importlib.import_module("newsletter.cli")
        importlib.import_module("newsletter.dispatch")
    except ImportError as exc:
        problem = f"cannot import the project ({exc})"
    if problem is None and _find_script() is None:
        problem = "the `newsletter` command is not installed"
    if problem:
        print(f"{problem}: installing this project (pip install -e {ROOT}) ...", file=sys.stderr, flush=True)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-e", str(ROOT)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise BenchError(f"cannot install the project: {(done.stderr or done.stdout).strip()[-400:]}")
        importlib.invalidate_caches()
        try:
            importlib.import_module("newsletter.cli")
            importlib.import_module("newsletter.dispatch")
        except ImportError as exc:
            raise BenchError(f"the project still cannot be imported after installing it: {exc}") from None
    script = _find_script()
    if script is None:
        raise BenchError("the `newsletter` command is not on PATH even after pip install -e; check the PATH")
    check = subprocess.run(
        [sys.executable, "-c", "import newsletter; print(newsletter.__file__)"],
        capture_output=True,
        text=True,
        env=child_env(),
    )
    where = Path(check.stdout.strip()).resolve().parent if check.returncode == 0 else None
    if where != ROOT / "newsletter":
        raise BenchError(
            f"the app's commands would not run this checkout's code (they import {where}); "
            f"check PYTHONPATH or install the project with pip install -e {ROOT}"
        )
    return [script]


# ---- PostgreSQL -----------------------------------------------------------------------------------


class PostgresCluster:
    """A throwaway PostgreSQL cluster on a free loopback port, removed on exit."""

    def __init__(self) -> None:
        self.bindir = postgres_bindir()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="newsletter-bench-pg-"))
        self.user: str | None = None
        self.started = False

    def _run(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
        command = args
        if self.user:
            command = ["runuser", "-u", self.user, "--", *args]
        done = subprocess.run(command, capture_output=True, text=True)
        if check and done.returncode != 0:
            raise BenchError(f"{Path(args[0]).name} failed: {(done.stderr or done.stdout).strip()[-600:]}")
        return done

    def start(self) -> None:
        if is_root():
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise BenchError(
                    "running as root needs the 'postgres' user to run the PostgreSQL server "
                    "(it comes with the Debian package postgresql)"
                ) from None
            self.user = "postgres"
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        on_cleanup(self.stop)
        data = self.dir / "data"
        self._run(
            [str(self.bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"]
        )
        done = self._run(
            [
                str(self.bindir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(self.dir / "log"),
                "-w",
                "start",
                "-o",
                f"-k {self.dir} -p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100",
            ],
            check=False,
        )
        self.started = True  # stop() is harmless if it did not start
        if done.returncode != 0:
            log = (self.dir / "log").read_text(errors="replace") if (self.dir / "log").exists() else ""
            raise BenchError(f"PostgreSQL did not start: {(log or done.stderr or done.stdout).strip()[-600:]}")

    def stop(self) -> None:
        if self.started:
            self._run(
                [str(self.bindir / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop"], check=False
            )
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        from sqlalchemy import create_engine, text

        admin = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            conn.execute(text(f"CREATE DATABASE {name}"))
        admin.dispose()
        return self.url(name)

    def drop_database(self, name: str) -> None:
        from sqlalchemy import create_engine, text

        admin = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


# ---- configuration --------------------------------------------------------------------------------


def write_config(
    path: Path,
    database_url: str,
    smtp_port: int,
    feed: Path | str = "",
    extra_smtp: dict[str, int] | None = None,
    secret: str = "",
    sections: str = "",
) -> Path:
    """A config as a user would write it: local SMTP without TLS, everything else at its default (or as the
    TOML of SECTIONS says)."""
    import secrets

    secret = secret or secrets.token_urlsafe(32)
    smtp_lines = "".join(f"{key} = {value}\n" for key, value in (extra_smtp or {}).items())
    path.write_text(
        f"""[site]
name = "Bench Blog"
base_url = "https://news.bench.example"
feed_url = "{feed}"

[security]
secret_key = "{secret}"

[database]
url = "{database_url}"

[smtp]
host = "127.0.0.1"
port = {smtp_port}
security = "none"
from = "Bench Blog <news@bench.example>"
{smtp_lines}{sections}""",
        encoding="utf-8",
    )
    return path


def run_checked(args: list[str], what: str, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    done = subprocess.run(args, capture_output=True, text=True, env=env or child_env(), timeout=timeout)
    if done.returncode != 0:
        raise BenchError(
            f"{what} failed (exit {done.returncode}): {(done.stderr.strip() or done.stdout.strip())[-800:]}"
        )
    return done.stdout


# ---- profiles -------------------------------------------------------------------------------------


def find_pyspy() -> str:
    candidates = [Path(sys.executable).parent / "py-spy", shutil.which("py-spy")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    print("installing py-spy with pip ...", file=sys.stderr, flush=True)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "py-spy"],
        capture_output=True,
        text=True,
    )
    for candidate in [Path(sys.executable).parent / "py-spy", shutil.which("py-spy")]:
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    raise BenchError(f"--profile needs py-spy, which pip could not install: {done.stderr.strip()[-300:]}")


def summarize_profile(path: Path, mode: str, top: int = 25) -> str:
    """Top functions by own (leaf) samples and by inclusive samples, from py-spy's raw (collapsed) output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        samples = int(count)
        frames = [short_frame(frame) for frame in stack.split(";") if frame]
        if not frames:
            continue
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    if not total:
        return "no samples"
    what = {
        "gil": "of the thread holding the GIL",
        "active": "of running (non-idle) threads",
        "wall": "of all threads, idle or not",
    }[mode]
    lines = [
        f"{total} samples {what}",
        "",
        "own time (leaf frames; C calls count in the Python function calling them):",
    ]
    lines += [f"  {100 * c / total:5.1f}%  {name}" for name, c in own.most_common(top)]
    lines += ["", "inclusive time:"]
    lines += [f"  {100 * c / total:5.1f}%  {name}" for name, c in inclusive.most_common(top)]
    return "\n".join(lines)


def short_frame(frame: str) -> str:
    match = re.match(r"(.*) \((.*)\)$", frame)
    if not match:
        return frame
    name, where = match.groups()
    where = re.sub(r"^.*/(site-packages|lib/python3\.\d+)/", "", where)
    if where.startswith(str(ROOT) + "/"):
        where = where[len(str(ROOT)) + 1 :]
    return f"{name} ({where})"
