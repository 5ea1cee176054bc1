"""A real Postfix relay that cannot deliver: the server behind it refuses a reader after Postfix accepted the
email, so Postfix writes the bounce itself and sends it to the email's VERP address; Postfix delivers that
bounce into a Maildir, and `newsletter inbound --maildir` marks the reader bounced; the same bounce piped into
`newsletter inbound` is understood too. (Postfix's pipe transport runs its command as an unprivileged user,
who cannot run an interpreter installed in root's home, as on the test machines: so Postfix hands the bounce
over through its own Maildir delivery, and the test pipes it.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from .conftest import SMTPSink, free_port, publish
from .test_inbound import BOUNCES, VERP, inbound

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
NOBODY = 65534  # owns the Maildir that Postfix's virtual delivery writes


@pytest.fixture
def extra_config() -> str:
    return f'\n[bounces]\naddress = "{BOUNCES}"\n'


@dataclass
class Relay:
    port: int
    maildir: Path
    log: Path


def main_cf(home: Path, port: int, mailbox_port: int) -> str:
    return f"""compatibility_level = 3.6
queue_directory = {home}/spool
data_directory = {home}/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = {home}/maillog
maillog_file_prefixes = {home}
myhostname = relay.news.example.com
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
relay_domains = example.org
transport_maps = inline:{{ example.org=smtp:[127.0.0.1]:{mailbox_port} }}
smtp_dns_support_level = disabled
smtp_tls_security_level = none
recipient_delimiter = +
virtual_mailbox_domains = news.example.com
virtual_mailbox_base = {home}/mail
virtual_mailbox_maps = inline:{{ bounces@news.example.com=bounces/ }}
virtual_uid_maps = static:{NOBODY}
virtual_gid_maps = static:{NOBODY}
alias_maps =
alias_database =
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
delay_warning_time = 0
"""


MASTER_CF = """{port}  inet  n  -  n  -  -  smtpd
pickup    unix  n  -  n  60  1  pickup
cleanup   unix  n  -  n  -   0  cleanup
qmgr      unix  n  -  n  300 1  qmgr
rewrite   unix  -  -  n  -   -  trivial-rewrite
bounce    unix  -  -  n  -   0  bounce
defer     unix  -  -  n  -   0  bounce
trace     unix  -  -  n  -   0  bounce
verify    unix  -  -  n  -   1  verify
flush     unix  n  -  n  1000? 0 flush
proxymap  unix  -  -  n  -   -  proxymap
smtp      unix  -  -  n  -   -  smtp
showq     unix  n  -  n  -   -  showq
error     unix  -  -  n  -   -  error
retry     unix  -  -  n  -   -  error
discard   unix  -  -  n  -   -  discard
virtual   unix  -  n  n  -   -  virtual
anvil     unix  -  -  n  -   1  anvil
scache    unix  -  -  n  -   1  scache
postlog   unix-dgram n - n  -   1  postlogd
"""


@pytest.fixture
def relay(smtp_port: int) -> Iterator[Relay]:
    """A private Postfix instance on a free port, relaying example.org to the test's SMTP server."""
    if not Path(POSTFIX).exists():
        pytest.skip("Postfix is not installed (apt-get install postfix)")
    if os.geteuid() != 0:
        pytest.skip("a private Postfix instance must be started as root")
    home = Path(tempfile.mkdtemp(prefix="postfix-"))
    os.chmod(home, 0o755)
    port = free_port()
    for sub in ("etc", "spool", "data", "mail"):
        (home / sub).mkdir()
    shutil.chown(home / "data", "postfix")
    os.chown(home / "mail", NOBODY, NOBODY)
    (home / "etc" / "main.cf").write_text(main_cf(home, port, smtp_port))
    (home / "etc" / "master.cf").write_text(MASTER_CF.format(port=f"127.0.0.1:{port}"))
    postfix = [POSTFIX, "-c", str(home / "etc")]
    started = subprocess.run([*postfix, "start"], capture_output=True, text=True, timeout=60)
    log = home / "maillog"
    try:
        assert started.returncode == 0, started.stderr + started.stdout
        yield Relay(port, home / "mail" / "bounces", log)
    finally:
        subprocess.run([*postfix, "stop"], capture_output=True, timeout=60)
        pid_file = home / "spool" / "pid" / "master.pid"
        if pid_file.exists():  # a master that did not stop in time
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def mailbox_host(smtp_port: int) -> Iterator[SMTPSink]:
    """The readers' mail server behind the relay: it knows ada and refuses everyone else."""
    sink = SMTPSink(reply=lambda rcpt: None if rcpt.startswith("ada@") else f"550 5.1.1 <{rcpt}>: user unknown")
    controller = Controller(sink, hostname="127.0.0.1", port=smtp_port)
    controller.start()
    yield sink
    controller.stop()


def newsletter(config_file: Path, *args: str) -> str:
    result = subprocess.run(
        ["newsletter", "--config", str(config_file), *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def statuses(config_file: Path) -> dict[str, str]:
    listed = json.loads(newsletter(config_file, "subscribers", "list", "--json"))["subscribers"]
    return {row["email"]: row["status"] for row in listed}


def test_a_bounce_postfix_writes_itself_comes_back_and_marks_the_reader_bounced(
    relay: Relay, mailbox_host: SMTPSink, config_file: Path, feed: Path, smtp_port: int
) -> None:
    config_file.write_text(config_file.read_text().replace(f"port = {smtp_port}", f"port = {relay.port}"))
    newsletter(config_file, "db", "upgrade")
    newsletter(config_file, "posts", "fetch")
    for reader in ("ada@example.org", "gone@example.org"):
        newsletter(config_file, "subscribers", "add", reader, "--confirmed")
    publish(feed, "The new crane", "crane")
    newsletter(config_file, "send")

    deadline = time.monotonic() + 60
    while not (relay.maildir / "new").is_dir() or not any((relay.maildir / "new").iterdir()):
        assert time.monotonic() < deadline, relay.log.read_text() if relay.log.exists() else "no Postfix log"
        time.sleep(0.25)
    [bounce] = list((relay.maildir / "new").iterdir())
    raw = bounce.read_bytes()
    assert b"MAILER-DAEMON" in raw and b"5.1.1" in raw
    assert VERP.search(raw.decode("latin-1"))
    assert [m.recipients for m in mailbox_host.messages] == [["ada@example.org"]]

    said = newsletter(config_file, "inbound", "--maildir", str(relay.maildir))
    assert said.splitlines()[-1] == "processed 1: bounced 1", said
    assert statuses(config_file) == {"ada@example.org": "confirmed", "gone@example.org": "bounced"}

    again = inbound(config_file, raw)  # the same bounce piped in, as an MTA's pipe transport hands it over
    assert again.returncode == 0 and again.stdout.decode().startswith("bounced:")
