"""What must not drift apart: the config dataclasses and config.example.toml, the models and the
migrations, and the command output README.md shows and what the commands print."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import threading
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from click.testing import CliRunner
from sqlalchemy import Column, Integer, MetaData, select

from newsletter import db
from newsletter.cli import cli
from newsletter.config import SECTIONS, load_config
from newsletter.models import Base, Subscriber
from newsletter.runtime import Newsletter
from newsletter.subscriptions import set_frequency

from .conftest import Site, SMTPSink, publish
from .test_approval import require_approval
from .test_feed_input import HTML_ERROR_PAGE, truncated
from .test_inbound import BOUNCES, postfix_dsn, sent_post

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def dataclass_keys() -> set[str]:
    return {
        f"[{section}] {f.name.rstrip('_')}" for section, make in SECTIONS.items() for f in dataclasses.fields(make())
    }


def test_config_example_has_every_key_and_no_other() -> None:
    example = tomllib.loads((ROOT / "config.example.toml").read_text(encoding="utf-8"))
    documented = {f"[{section}] {key}" for section, values in example.items() for key in values}
    assert not dataclass_keys() - documented, f"add to config.example.toml: {sorted(dataclass_keys() - documented)}"
    assert not documented - dataclass_keys(), f"not a config key: {sorted(documented - dataclass_keys())}"
    load_config(ROOT / "config.example.toml", environ={"NEWSLETTER_SECURITY__SECRET_KEY": "s3cret-" * 6})


def schema_differences(database_url: str, metadata: MetaData) -> list[object]:
    engine = db.make_engine(database_url)
    try:
        db.upgrade(engine)
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def test_migrations_build_exactly_the_models(database_url: str) -> None:
    """Alembic's autogenerate finds nothing to add: a model change without its migration fails here."""
    assert schema_differences(database_url, Base.metadata) == []


def test_the_latest_revision_read_from_file_names_is_alembics() -> None:
    alembic = AlembicConfig()
    alembic.set_main_option("script_location", str(ROOT / "migrations"))
    scripts = ScriptDirectory.from_config(alembic)
    for script in scripts.walk_revisions():
        assert Path(script.path).name.startswith(f"{script.revision}_"), f"{script.path}: name it {script.revision}_…"
    assert db.head_revision() == scripts.get_current_head()


def test_a_model_change_without_a_migration_is_found(database_url: str) -> None:
    changed = MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["subscribers"].append_column(Column("nickname_length", Integer))
    [difference] = schema_differences(database_url, changed)
    assert difference[0] == "add_column" and difference[3].name == "nickname_length"


# ---- README.md's samples of what commands print, replayed ---------------------------------------


FENCE = re.compile(r"^( *)```[^\n]*\n(.*?)\n\1```[ \t]*$", re.M | re.S)
Session = list[tuple[str, list[str]]]


@dataclass(frozen=True)
class Block:
    """A fenced block of README.md: the line it starts on, and its lines without the indentation of its fence."""

    line: int
    lines: list[str]

    def session(self) -> Session:
        """Its `$ command` lines (a trailing backslash continues one), each with the lines shown after it."""
        session: Session = []
        for line in re.sub(r"\\\n\s*", " ", "\n".join(self.lines)).splitlines():
            if line.startswith("$ "):
                session.append((line[2:].strip(), []))
            elif session:
                session[-1][1].append(line)
        return [(command, _lines("\n".join(shown).rstrip())) for command, shown in session]


def _lines(text: str) -> list[str]:
    return text.split("\n") if text else []


def readme_blocks() -> list[Block]:
    blocks = []
    for fence in FENCE.finditer(README):
        indent = len(fence[1])
        blocks.append(Block(README.count("\n", 0, fence.start()) + 1, [line[indent:] for line in fence[2].split("\n")]))
    return blocks


def readme_sample(anchor: str) -> Block:
    """The first block after the text ANCHOR of README.md that has a `$ command` in it."""
    start = README.index(anchor)
    before = README.count("\n", 0, start) + 1
    return next(block for block in readme_blocks() if block.line > before and block.session())


def pipeline(command: str) -> tuple[str, str]:
    """COMMAND split at its first `|` outside quotes and `$(…)`: the first command and the rest ("" if none)."""
    quote, depth, i = "", 0, 0
    while i < len(command):
        char = command[i]
        if char == "\\" and quote != "'":
            i += 2
            continue
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif command.startswith("$(", i):
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif char == "|" and not depth:
            return command[:i].strip(), command[i + 1 :].strip()
        i += 1
    return command.strip(), ""


@dataclass
class Terminal:
    """Runs README command lines as the owner's shell would, in FOLDER (also $HOME): `newsletter` is the command
    on the test's config (through click, in this process), `curl` an HTTP request to the test's site (through
    requests; the README's public addresses lead there), any other line bash; what follows a `|` is bash too.
    Words are expanded by bash, with the variables earlier lines set."""

    config_file: Path
    folder: Path
    site: Site | None = None
    variables: dict[str, str] = dataclasses.field(default_factory=dict)
    status: int = 0

    def __post_init__(self) -> None:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
        self.variables = environ | {"HOME": str(self.folder)} | self.variables

    def __call__(self, command: str) -> list[str]:
        first, rest = pipeline(command)
        program = first.split()[0]
        if program == "newsletter":
            config = os.path.relpath(self.config_file, self.folder)  # ./config.toml, as the README's commands read it
            with contextlib.chdir(self.folder):
                result = CliRunner().invoke(cli, ["--config", config, *self.words(first)[1:]])
            assert result.exception is None or isinstance(result.exception, SystemExit), result.output
            printed, self.status = result.output, result.exit_code
        elif program == "curl":
            printed = self.curl(self.words(first)[1:])
        else:
            printed, rest = self.bash(command), ""
        if rest:
            piped = subprocess.run(["bash", "-c", rest], input=printed, capture_output=True, text=True, timeout=30)
            printed = piped.stdout + piped.stderr
        return printed.splitlines()

    def words(self, command: str) -> list[str]:
        expanded = subprocess.run(
            ["bash", "-c", f'argv() {{ printf "%s\\0" "$@"; }}; argv {command}'],
            capture_output=True,
            text=True,
            env=self.variables,
            cwd=self.folder,
            timeout=30,
            check=True,
        )
        return expanded.stdout.split("\0")[:-1]

    def bash(self, command: str) -> str:
        """Run COMMAND; the variables it sets stay for the next lines."""
        dump = self.folder / ".terminal-variables"
        script = f"set -a\n{command}\nstatus=$?\nenv -0 > {shlex.quote(str(dump))}\nexit $status"
        done = subprocess.run(
            ["bash", "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.variables,
            cwd=self.folder,
            timeout=30,
        )
        self.status = done.returncode
        self.variables = dict(item.split("=", 1) for item in dump.read_text().split("\0") if "=" in item)
        return done.stdout

    def curl(self, args: list[str]) -> str:
        """What `curl ARGS` prints, for the options the README uses (any other fails the test)."""
        assert self.site is not None, "a README curl needs the test's site"
        method, headers, data, url, include = "", {}, None, "", False
        while args:
            arg = args.pop(0)
            if arg in ("-X", "--request"):
                method = args.pop(0)
            elif arg in ("-H", "--header"):
                name, _, value = args.pop(0).partition(":")
                headers[name.strip()] = value.strip()
            elif arg in ("-d", "--data"):
                data = args.pop(0)
                headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
            elif re.fullmatch(r"-[si]+", arg):
                include = include or "i" in arg
            elif not arg.startswith("-") and not url:
                url = arg
            else:
                raise AssertionError(f"the README runs curl with {arg!r}, which this replay does not know")
        public = urlsplit(url)
        ours = {urlsplit(self.site.nl.config.base_url).netloc, "127.0.0.1:8000", "localhost:8000"}
        assert public.netloc in ours, f"the README's curl asks {url}, not this site"
        local = self.site.base + public.path + (f"?{public.query}" if public.query else "")
        response = requests.request(
            method or ("POST" if data is not None else "GET"),
            local,
            headers=headers,
            data=data,
            allow_redirects=False,
            timeout=10,
        )
        self.status = 0
        if not include:
            return response.text
        version = response.raw.version
        head = [f"HTTP/{version // 10}.{version % 10} {response.status_code} {response.reason}"]
        head += [f"{name}: {value}" for name, value in response.headers.items()]
        return "\r\n".join(head) + "\r\n\r\n" + response.text


def elided(printed: list[str], shown: list[str]) -> list[str]:
    """PRINTED with the lines that a `...` line of SHOWN stands for replaced by that line."""
    marks = [i for i, line in enumerate(shown) if line.strip() == "..."]
    if len(marks) != 1 or len(printed) <= len(shown) - 1:
        return printed
    [mark] = marks
    after = len(shown) - mark - 1
    return printed[:mark] + [shown[mark]] + printed[len(printed) - after :]


def replay(
    block: Block,
    terminal: Terminal,
    before: Callable[[str], None] = lambda command: None,
    expect: Callable[[str], str] = lambda line: line,
    printed: Callable[[str], str] = lambda line: line,
) -> list[int]:
    """Run each command of BLOCK in TERMINAL (BEFORE it: what the command finds changes) and compare the lines
    it prints, passed through PRINTED, with those the README shows after it, passed through EXPECT: only what
    must differ may (today's date, a timestamp, the test server's address). Returns the exit statuses."""
    statuses = []
    for command, shown in block.session():
        before(command)
        lines = [printed(line) for line in terminal(command)]
        statuses.append(terminal.status)
        expected = [expect(line) for line in shown]
        assert elided(lines, expected) == expected, f"README.md line {block.line}: `{command}` prints other lines"
    return statuses


@pytest.fixture
def terminal(config_file: Path, tmp_path: Path) -> Terminal:
    """A terminal in TMP_PATH, on the test's config (the database is upgraded only for a test that asks for `nl`,
    `run` or `site`)."""
    return Terminal(config_file, tmp_path)


TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+\+00:00")


def test_readme_commands_print_what_the_readme_shows(terminal: Terminal, smtp: SMTPSink) -> None:
    """Replay the README's session on a fresh database; only today's date and timestamps may differ. Its
    `cat FILE` shows a file the next commands read: the file is written first."""
    block = readme_sample("## Commands")
    shown_day = next(out[0].split()[-1] for command, out in block.session() if command == "newsletter subscribers list")
    today = datetime.now(UTC).strftime("%Y-%m-%d")

    def write_what_cat_shows(command: str) -> None:
        if command.startswith("cat "):
            shown = dict(block.session())[command]
            (terminal.folder / command.split()[1]).write_text("\n".join(shown) + "\n", encoding="utf-8")

    replay(
        block,
        terminal,
        before=write_what_cat_shows,
        expect=lambda line: TIMESTAMP.sub("<time>", line.replace(shown_day, today)),
        printed=lambda line: TIMESTAMP.sub("<time>", line),
    )


def test_readme_configuration_errors_are_what_the_command_prints(terminal: Terminal, config_file: Path) -> None:
    """A value the config does not allow, then a database never upgraded."""
    settings = config_file.read_text(encoding="utf-8")
    configs = iter([settings.replace('security = "none"', 'security = "ssl"'), settings])

    def write_next_config(command: str) -> None:
        config_file.write_text(next(configs), encoding="utf-8")

    assert replay(readme_sample("## Configuration"), terminal, before=write_next_config) == [2, 2]


@dataclass
class Blog:
    """The blog's web server, serving its feed at `url`; what it serves can change between requests."""

    url: str
    feed: bytes = b""


@pytest.fixture
def blog(feed: Path, config_file: Path) -> Iterator[Blog]:
    """The test's feed served over HTTP, and the config reading it from there."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/rss+xml; charset=utf-8")
            self.send_header("Content-Length", str(len(served.feed)))
            self.end_headers()
            self.wfile.write(served.feed)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    served = Blog(f"http://127.0.0.1:{server.server_address[1]}/feed/", feed.read_bytes())
    config_file.write_text(config_file.read_text().replace(f'feed_url = "{feed}"', f'feed_url = "{served.url}"'))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield served
    server.shutdown()
    server.server_close()


def test_the_readme_shows_what_a_feed_that_is_not_a_feed_prints(terminal: Terminal, blog: Blog, run) -> None:
    """A WordPress feed cut off in its second item, then an HTML error page where the feed should be; the
    README names the feed by the address the feed gives itself (its atom:link rel="self")."""
    assert run("posts", "fetch").exit_code == 0
    listed = run("posts", "list").output
    whole = blog.feed
    itself = re.search(rb'<atom:link href="([^"]+)" rel="self"', whole)
    assert itself is not None
    public = itself[1].decode()
    served = iter([truncated(whole), HTML_ERROR_PAGE])

    def serve_next(command: str) -> None:
        blog.feed = next(served)

    statuses = replay(
        readme_sample("**Posts.**"),
        terminal,
        before=serve_next,
        expect=lambda line: line.replace(public, blog.url),
    )
    assert statuses == [1, 1]
    assert run("posts", "list").output == listed


def test_the_readme_shows_what_approving_and_skipping_posts_prints(
    terminal: Terminal, config_file: Path, feed: Path, run
) -> None:
    """Approval on; the feed's first fetch, then two posts the blog published."""
    require_approval(config_file)
    run("posts", "fetch")
    for title, slug in (("Ice on the quay", "ice"), ("Storm warning for the weekend", "storm")):
        publish(feed, title, slug)
        assert run("posts", "fetch").exit_code == 0
    assert replay(readme_sample("**Approval.**"), terminal) == [0] * 4


def test_the_readme_shows_what_stats_prints(
    terminal: Terminal, site: Site, smtp: SMTPSink, feed: Path, nl: Newsletter, run
) -> None:
    """Four readers get a post: one address is refused (bounced), one reader unsubscribes with the email's
    one-click link, one switches to a weekly digest; a fifth reader is added unconfirmed. The README's latest
    date is the day its sample was run (the post was sent that day): its other dates move with it to today,
    the weeks to this week's Monday."""
    run("posts", "fetch")
    readers = ["ada@example.com", "gone@example.com", "leaving@example.com", "weekly@example.com"]
    for address in readers:
        run("subscribers", "add", address, "--confirmed")
    run("subscribers", "add", "maybe@example.com")
    publish(feed, "Gale on Sunday", "gale")
    smtp.reply = lambda rcpt: "550 5.1.1 User unknown" if rcpt == "gone@example.com" else None
    assert "3 sent, 1 failed" in run("send").output
    one_click = smtp.to("leaving@example.com")[-1].message["List-Unsubscribe"].split(",")[0].strip("<>")
    assert site.post(one_click, data={"List-Unsubscribe": "One-Click"}).status_code == 200
    with nl.sessions.begin() as session:
        set_frequency(session.scalar(select(Subscriber).where(Subscriber.email_key == "weekly@example.com")), "weekly")

    block = readme_sample("`stats` adds weekly growth")
    shown_today = max(date.fromisoformat(day) for day in re.findall(r"\d{4}-\d\d-\d\d", "\n".join(block.lines)))
    today = datetime.now(UTC).date()

    def moved(line: str) -> str:
        week = re.fullmatch(r"  (\d{4}-\d\d-\d\d)  [+]\d+  -\d+", line)

        def to_today(day: re.Match[str]) -> str:
            shown = date.fromisoformat(day[0])
            if week:  # the weeks end with this one, on Mondays
                shown_monday = shown_today - timedelta(days=shown_today.weekday())
                return str(today - timedelta(days=today.weekday()) - (shown_monday - shown))
            return str(today - (shown_today - shown))

        return re.sub(r"\d{4}-\d\d-\d\d", to_today, line)

    assert replay(block, terminal, expect=moved) == [0]


@pytest.mark.parametrize("extra_config", [f'\n[bounces]\naddress = "{BOUNCES}"\n'], ids=["bounces"])
def test_the_readme_shows_what_inbound_prints_for_a_maildir(
    terminal: Terminal, smtp: SMTPSink, feed: Path, tmp_path: Path, run
) -> None:
    """~/Maildir holds what came back from a post to two readers: Postfix's reports of a permanent failure for
    the first and of a full mailbox (4.2.2) it gave up on for the second, and the second's vacation reply."""
    got = sent_post(run, smtp, feed, "gone@example.org", "full@example.org")
    full = postfix_dsn(got["full@example.org"], "failed", "4.2.2", "smtp; 452 4.2.2 Mailbox full")
    away = (
        f"From: full@example.org\r\nTo: {got['full@example.org'].sender}\r\nSubject: Out of Office: The new crane"
        "\r\n\r\nI am away until Monday.\r\n"
    ).encode()
    for sub in ("new", "cur", "tmp"):
        (tmp_path / "Maildir" / sub).mkdir(parents=True)
    for number, raw in enumerate([postfix_dsn(got["gone@example.org"]), full, away], start=1):
        (tmp_path / "Maildir" / "new" / f"1733220000.{number}.mx").write_bytes(raw)
    assert replay(readme_sample("fetch it into a Maildir"), terminal) == [0]
    assert not list((tmp_path / "Maildir" / "new").iterdir())


def test_the_readme_shows_what_a_request_for_another_host_gets(terminal: Terminal, site: Site) -> None:
    """The README's curl, with a forged Host, to the site on the loopback address."""
    terminal.site = site
    replay(readme_sample("answers a load balancer that asks by IP address"), terminal)


HOOK_SECRET = "a-webhook-secret-for-the-readme-session"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the README signs the ping with openssl (Debian: openssl)")
@pytest.mark.parametrize("extra_config", [f'\n[schedule]\nwebhook_secret = "{HOOK_SECRET}"\n'], ids=["hook"])
def test_the_readme_shows_what_the_publish_webhook_answers(terminal: Terminal, site: Site) -> None:
    """The README's static-site build step: its shell lines sign the ping (openssl), curl sends it twice."""
    terminal.site = site
    terminal.variables["NEWSLETTER_HOOK_SECRET"] = HOOK_SECRET
    assert replay(readme_sample("From a static-site build"), terminal) == [0] * 4


README_SAMPLES: dict[str, Callable[..., None] | str] = {
    "## Configuration": test_readme_configuration_errors_are_what_the_command_prints,
    "## Commands": test_readme_commands_print_what_the_readme_shows,
    "It also reads the exports": "test_import.py::test_the_readme_shows_what_an_import_of_mailchimp_files_prints",
    "**Posts.**": test_the_readme_shows_what_a_feed_that_is_not_a_feed_prints,
    "**Approval.**": test_the_readme_shows_what_approving_and_skipping_posts_prints,
    "`stats` adds weekly growth": test_the_readme_shows_what_stats_prints,
    "fetch it into a Maildir": test_the_readme_shows_what_inbound_prints_for_a_maildir,
    "answers a load balancer that asks by IP address": test_the_readme_shows_what_a_request_for_another_host_gets,
    "From a static-site build": test_the_readme_shows_what_the_publish_webhook_answers,
}


def test_every_readme_sample_of_what_a_command_prints_is_replayed() -> None:
    """A block of README.md with a `$ command` followed by what it prints is compared with the real output by
    the test README_SAMPLES names for it; a new sample needs a test (the demo's banner: test_init.py)."""
    showing = {block.line for block in readme_blocks() if any(shown for command, shown in block.session())}
    replayed = {readme_sample(anchor).line: test for anchor, test in README_SAMPLES.items()}
    assert len(replayed) == len(README_SAMPLES), "two anchors of README_SAMPLES find the same block"
    for test in README_SAMPLES.values():
        if isinstance(test, str):
            module, name = test.split("::")
            assert f"\ndef {name}(" in (ROOT / "tests" / module).read_text(encoding="utf-8"), f"no test {test}"
    assert showing == set(replayed), f"README.md lines {sorted(showing - set(replayed))}: replay them in a test"
