"""Postfix as a real relay that cannot deliver to an address: the app sends through a private Postfix instance,
the readers' mail server behind it refuses one reader after Postfix accepted the email, so Postfix writes the
bounce itself and sends it to that email's VERP return path, bounces+TOKEN@news.example.com. Postfix delivers
news.example.com through a pipe transport that runs `newsletter inbound --recipient ${original_recipient}`,
which marks the reader bounced.

Postfix starts only as root, and its pipe refuses to run a command as root: the command runs as nobody, on an
installation (config, SQLite database) that nobody may read and write. Where the interpreter lives under a
directory only root may enter (pyenv in root's home, as on our test machines), Postfix runs in a mount
namespace of its own in which each such directory is replaced by a view of just the entries on the way to the
interpreter; nothing changes outside that namespace."""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import newsletter
from newsletter.models import Status
from newsletter.runtime import Newsletter

from .conftest import SMTPSink, free_port, publish
from .test_inbound import BOUNCES, VERP, status_of

POSTFIX = shutil.which("postfix", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
PIPE_USER = "nobody"
SYSTEM_PATH = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}  # Postfix, util-linux; no interpreter of ours
COMMAND = [sys.executable, "-c", "from newsletter.cli import main; main()"]  # the tests' own interpreter


@pytest.fixture
def extra_config() -> str:
    return f'\n[bounces]\naddress = "{BOUNCES}"\n'


@pytest.fixture
def home() -> Iterator[Path]:
    """A directory everyone may enter, for the installation and the Postfix instance; removed afterwards."""
    if POSTFIX is None:
        pytest.skip("Postfix is not installed (apt-get install postfix)")
    if os.geteuid() != 0:
        pytest.skip("a private Postfix instance can only be started as root")
    path = Path(tempfile.mkdtemp(prefix="newsletter-postfix-"))
    path.chmod(0o755)
    assert not closed_directories({path}), f"{path} is in a directory that {PIPE_USER} may not enter: set TMPDIR"
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tmp_path(home: Path) -> Path:
    """The installation (config, SQLite database, feed) where the pipe user may reach it: pytest's own
    tmp_path is private to the user who runs the tests."""
    path = home / "site"
    path.mkdir(mode=0o755)
    return path


@pytest.fixture
def relay_port() -> int:
    return free_port()


@pytest.fixture
def config_file(config_file: Path, relay_port: int) -> Path:
    """The app sends to the relay; `smtp`, on smtp_port, is the readers' mail server behind it."""
    text, replaced = re.subn(r"(?m)^port = \d+$", f"port = {relay_port}", config_file.read_text())
    assert replaced == 1
    config_file.write_text(text)
    return config_file


@dataclass
class Relay:
    port: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(Postfix wrote no log)"


def postfix_defaults(*names: str) -> list[str]:
    postconf = str(Path(POSTFIX or "postfix").with_name("postconf"))
    found = subprocess.run([postconf, "-d", "-h", *names], capture_output=True, text=True, timeout=30)
    assert found.returncode == 0, found.stderr
    return found.stdout.split()


def main_cf(spool: Path, log: Path, mail_server_port: int) -> str:
    command_dir, daemon_dir, meta_dir, shlib_dir = postfix_defaults(
        "command_directory", "daemon_directory", "meta_directory", "shlib_directory"
    )
    return f"""compatibility_level = 3.6
queue_directory = {spool}
data_directory = {spool.parent / "data"}
command_directory = {command_dir}
daemon_directory = {daemon_dir}
meta_directory = {meta_dir}
shlib_directory = {shlib_dir}
mail_owner = postfix
setgid_group = postdrop
maillog_file = {log}
maillog_file_prefixes = {log.parent}
myhostname = mx.news.example.com
mydestination =
alias_maps =
alias_database =
local_recipient_maps =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relay_domains = example.org, news.example.com
transport_maps = inline:{{ example.org=smtp:[127.0.0.1]:{mail_server_port}, news.example.com=newsletter: }}
newsletter_destination_recipient_limit = 1
smtp_dns_support_level = disabled
smtp_tls_security_level = none
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
"""


def master_arg(arg: str) -> str:
    """One argument of a master.cf command line: Postfix 3.0 and later take {...} around one with spaces."""
    return "{" + arg + "}" if re.search(r"\s", arg) else arg


def master_cf(port: int, inbound: list[str]) -> str:
    services = f"""127.0.0.1:{port} inet n - n - - smtpd
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
newsletter unix - n n - - pipe
  flags=R user={PIPE_USER} argv="""
    return services + " ".join(map(master_arg, [*inbound, "--recipient", "${original_recipient}"])) + "\n"


def as_pipe_user(argv: list[str]) -> list[str]:
    user = pwd.getpwnam(PIPE_USER)
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--", *argv]


def closed_directories(paths: set[Path]) -> dict[Path, set[str]]:
    """The directories on the way to PATHS that others may not enter, each with the names below it on that way."""
    closed: dict[Path, set[str]] = {}
    for path in paths:
        for parent in path.parents:
            if not parent.stat().st_mode & stat.S_IXOTH:
                closed.setdefault(parent, set()).add(path.relative_to(parent).parts[0])
    return closed


def opened_view(home: Path) -> list[str]:
    """Shell commands, for a mount namespace of its own, that replace each directory on the way to the
    interpreter that others may not enter (but the pipe user must) by an open one holding just the entries
    on that way, each the original bound in place."""
    wanted = {Path(sys.executable), Path(sys.prefix), Path(sys.base_prefix), Path(newsletter.__file__).parent}
    wanted |= {Path(entry) for entry in sys.path if entry and Path(entry).exists()}
    wanted |= {path.resolve() for path in wanted}
    commands = []
    for n, (directory, names) in enumerate(sorted(closed_directories(wanted).items(), key=lambda i: len(i[0].parts))):
        original = home / "namespace" / str(n)
        original.mkdir(parents=True)
        commands += [
            f"mount --bind {shlex.quote(str(directory))} {shlex.quote(str(original))}",
            f"mount -t tmpfs -o mode=0755,size=1m newsletter-test {shlex.quote(str(directory))}",
        ]
        for name in sorted(names):
            inside = shlex.quote(str(directory / name))
            if (directory / name).is_symlink():
                commands.append(f"ln -s {shlex.quote(os.readlink(directory / name))} {inside}")
                continue
            commands += [
                f"{'mkdir' if (directory / name).is_dir() else 'touch'} {inside}",
                f"mount --bind {shlex.quote(str(original / name))} {inside}",
            ]
    return commands


def stop(postfix: list[str], pid_file: Path) -> None:
    """Postfix stopped, and its master gone (killed after 15 s) before its files are removed."""
    pid = int(pid_file.read_text().split()[0]) if pid_file.exists() else None
    subprocess.run([*postfix, "stop"], capture_output=True, timeout=60)
    deadline = time.monotonic() + 15
    while pid and Path(f"/proc/{pid}").exists():
        try:
            is_master = Path(f"/proc/{pid}/comm").read_text().strip() == "master"
        except OSError:
            break
        if not is_master:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.1)


@pytest.fixture
def relay(
    home: Path, tmp_path: Path, nl: Newsletter, config_file: Path, relay_port: int, smtp_port: int
) -> Iterator[Relay]:
    """A private Postfix instance on relay_port: it relays example.org to the readers' mail server on
    smtp_port and pipes mail for news.example.com into `newsletter inbound`, as the pipe user."""
    user = pwd.getpwnam(PIPE_USER)
    for path in [tmp_path, *tmp_path.rglob("*")]:  # the database exists now; SQLite as root keeps its owner
        os.chown(path, user.pw_uid, user.pw_gid)
    etc, spool, data = home / "postfix" / "etc", home / "postfix" / "spool", home / "postfix" / "data"
    for directory in (etc, spool, data):
        directory.mkdir(parents=True)
    shutil.chown(data, "postfix")
    log = home / "postfix" / "maillog"
    inbound = [*COMMAND, "--config", str(config_file), "inbound"]
    (etc / "main.cf").write_text(main_cf(spool, log, smtp_port))
    (etc / "master.cf").write_text(master_cf(relay_port, inbound))
    postfix = [POSTFIX or "postfix", "-c", str(etc)]
    probe = as_pipe_user([*inbound, "--help"])
    if subprocess.run(probe, capture_output=True, timeout=60, env=SYSTEM_PATH).returncode == 0:
        start = [*postfix, "start"]
    else:
        script = [*opened_view(home), shlex.join(probe) + " >/dev/null", "exec " + shlex.join([*postfix, "start"])]
        start = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-ec", "\n".join(script)]
    try:
        started = subprocess.run(start, capture_output=True, text=True, timeout=60, env=SYSTEM_PATH)
        assert started.returncode == 0, f"{started.stdout}{started.stderr}\n{Relay(relay_port, log).log_text()}"
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", relay_port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, Relay(relay_port, log).log_text()
                time.sleep(0.1)
        yield Relay(relay_port, log)
    finally:
        stop(postfix, spool / "pid" / "master.pid")


def test_a_bounce_postfix_writes_itself_comes_back_through_its_pipe_and_marks_the_reader_bounced(
    nl, run, smtp: SMTPSink, feed: Path, relay: Relay
) -> None:
    smtp.reply = lambda rcpt: None if rcpt.startswith("ada@") else f"550 5.1.1 <{rcpt}>: user unknown"
    run("posts", "fetch")
    for reader in ("ada@example.org", "gone@example.org"):
        assert run("subscribers", "add", reader, "--confirmed").exit_code == 0
    publish(feed, "The new crane", "crane")
    sent = run("send")
    assert sent.exit_code == 0, sent.output

    returned = re.compile(  # pipe logs what the command printed
        r"to=<(bounces\+[^>]+)>, relay=newsletter, .* status=sent \(delivered via newsletter service "
        r"\(bounced: reader \d+: permanent failure 5\.1\.1\)\)"
    )
    deadline = time.monotonic() + 30
    while status_of(nl, "gone@example.org").status is not Status.BOUNCED or not returned.search(relay.log_text()):
        assert time.monotonic() < deadline, f"no bounce came back within 30 s; Postfix's log:\n{relay.log_text()}"
        time.sleep(0.2)
    assert status_of(nl, "ada@example.org").status is Status.CONFIRMED
    [delivered] = smtp.messages
    assert delivered.recipients == ["ada@example.org"] and VERP.fullmatch(delivered.sender)

    log = relay.log_text()
    assert re.search(r"to=<gone@example\.org>, relay=127\.0\.0\.1.* status=bounced .*5\.1\.1", log), log
    verp = returned.search(log).group(1)  # type: ignore[union-attr]
    assert VERP.fullmatch(verp) and verp != delivered.sender, log
    [post] = json.loads(run("stats", "--json").output)["recent_posts"]
    assert (post["sent"], post["bounced"]) == (2, 1)
