"""The one configuration file: TOML, with NEWSLETTER_<SECTION>__<KEY> environment overrides."""

from __future__ import annotations

import dataclasses
import functools
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.headerregistry import Address
from email.utils import parseaddr
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import tinycss2.color4
from email_validator import EmailNotValidError, validate_email
from limits import parse_many

from .i18n import missing_catalog
from .mailer import SECURITY_MODES
from .text import has_controls, hide_password

DEFAULT_PATH = "config.toml"
ENV_PREFIX = "NEWSLETTER_"
MIN_SECRET_KEY = 32
EMAIL_CONTENT = ("summary", "full")
MIN_LINK_CONTRAST = 3.0  # of [site] accent_color against white, for links to take it
TEXT_COLOR = "#1d2430"  # of pages and emails


class ConfigError(Exception):
    """A configuration problem; the message is one line naming the key or file and what to fix."""


@dataclass(frozen=True)
class SiteConfig:
    name: str = "Example Blog"
    base_url: str = "http://localhost:8000"
    feed_url: str = ""
    templates_dir: str = ""
    archive: bool = True
    categories: list[str] = field(default_factory=list)
    exclude_categories: list[str] = field(default_factory=list)
    require_approval: bool = False
    blog_url: str = ""  # default: the site of feed_url, when that is http(s)
    description: str = ""
    logo_url: str = ""
    accent_color: str = "#1f5fbf"  # validated, then written as #rrggbb
    email_content: str = "summary"
    language: str = "en"

    @property
    def blog(self) -> str:
        """The blog's address: blog_url, else the site of an http(s) feed_url, else empty."""
        if self.blog_url:
            return self.blog_url
        return origin_of(self.feed_url) + "/" if self.feed_url.startswith(("http://", "https://")) else ""

    @property
    def accent_text(self) -> str:
        """Black or white, whichever reads better on a button of the accent colour."""
        return "#000000" if _luminance(self.accent_color) > 0.179 else "#ffffff"

    @property
    def link_color(self) -> str:
        """The accent, or the text colour when the accent is too pale to read on white."""
        return self.accent_color if contrast_ratio(self.accent_color) >= MIN_LINK_CONTRAST else TEXT_COLOR


@dataclass(frozen=True)
class SecurityConfig:
    secret_key: str = ""
    secret_key_fallbacks: list[str] = field(default_factory=list)
    confirm_max_age_hours: int = 48


@dataclass(frozen=True)
class DatabaseConfig:
    url: str = "sqlite:///newsletter.db"


@dataclass(frozen=True)
class SMTPConfig:
    host: str = "localhost"
    port: int = 587
    security: str = "starttls"
    username: str = ""
    password: str = ""
    from_: str = "Example Blog <news@example.com>"
    timeout: int = 30
    connections: int = 4
    batch_size: int = 100
    processes: int = 0
    max_per_second: int = 0
    max_per_day: int = 0


@dataclass(frozen=True)
class WebConfig:
    trusted_proxies: int = 0
    rate_limit: str = "10 per hour"
    embed_origins: list[str] = field(default_factory=list)
    min_fill_seconds: int = 2
    signup_ceiling: int = 100
    network_ceiling: int = 20
    unconfirmed_days: int = 30


FREQUENCIES = ("instant", "daily", "weekly")
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


@dataclass(frozen=True)
class DigestConfig:
    default_frequency: str = "instant"
    send_hour: int = 8
    weekday: str = "monday"
    timezone: str = "UTC"


@dataclass(frozen=True)
class ScheduleConfig:
    poll_minutes: int = 0
    webhook_secret: str = ""


@dataclass(frozen=True)
class BouncesConfig:
    address: str = ""  # the envelope sender's address: on, each email is sent from address's local part + token

    @property
    def local_part(self) -> str:
        return self.address.rpartition("@")[0]

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]


@dataclass(frozen=True)
class DKIMConfig:
    selector: str = ""
    domain: str = ""
    private_key_file: str = ""


@dataclass(frozen=True)
class Config:
    site: SiteConfig = field(default_factory=SiteConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    smtp: SMTPConfig = field(default_factory=SMTPConfig)
    web: WebConfig = field(default_factory=WebConfig)
    dkim: DKIMConfig = field(default_factory=DKIMConfig)
    digest: DigestConfig = field(default_factory=DigestConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    bounces: BouncesConfig = field(default_factory=BouncesConfig)
    source: str = "defaults"
    demo: bool = False

    @functools.cached_property
    def from_address(self) -> Address:
        name, addr = parseaddr(self.smtp.from_)
        local, _, domain = addr.rpartition("@")
        return Address(display_name=name, username=local, domain=domain)

    @property
    def base_url(self) -> str:
        return self.site.base_url.rstrip("/")

    @property
    def form_origins(self) -> set[str]:
        """The sites whose pages may post the subscribe form: ours, the blog's and [web] embed_origins."""
        origins = {origin_of(self.base_url), *map(origin_of, self.web.embed_origins)}
        if self.site.blog:
            origins.add(origin_of(self.site.blog))
        return origins


# each section field has a default_factory, its dataclass (typed as possibly MISSING)
SECTIONS = {
    f.name: cast(Callable[[], Any], f.default_factory)
    for f in dataclasses.fields(Config)
    if f.name not in ("source", "demo")
}


def origin_of(url: str) -> str:
    """scheme://host[:port] of URL, as a browser's Origin header names a site."""
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


def _luminance(hex_color: str) -> float:
    """Relative luminance (WCAG 2) of #rrggbb."""
    channels = [int(hex_color[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(color: str, other: str = "#ffffff") -> float:
    """WCAG 2 contrast ratio of two #rrggbb colours: 1 (none) to 21 (black on white)."""
    lighter, darker = sorted((_luminance(color), _luminance(other)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


def _toml_key(field_name: str) -> str:
    return field_name.rstrip("_")


def load_config(path: str | os.PathLike[str] | None = None, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read the file named by PATH, else $NEWSLETTER_CONFIG, else ./config.toml, then apply overrides."""
    environ = os.environ if environ is None else environ
    explicit = path is not None or "NEWSLETTER_CONFIG" in environ
    file = Path(path if path is not None else environ.get("NEWSLETTER_CONFIG", DEFAULT_PATH))
    data: dict[str, Any] = {}
    if file.is_file():
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file}: not valid TOML ({exc}); fix the file") from None
        except OSError as exc:
            raise ConfigError(f"{file}: cannot read it ({exc.strerror})") from None
    elif explicit:
        raise ConfigError(
            f"{file}: no such configuration file; write one with `newsletter config example > {file}` and edit it"
        )
    source = str(file) if file.is_file() else f"{file} (not found)"
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        if section not in SECTIONS or key not in {_toml_key(f.name) for f in dataclasses.fields(SECTIONS[section]())}:
            raise ConfigError(
                f"environment variable {name}: there is no key [{section}] {key}; fix or remove the variable"
            )
        data.setdefault(section, {})[key] = value
    return config_from_dict(data, source=source)


def config_from_dict(data: dict[str, Any], *, source: str = "settings", demo: bool = False) -> Config:
    """Build and validate a Config from TOML-shaped data (strings are converted where a number is due)."""
    sections: dict[str, Any] = {}
    for section, values in data.items():
        factory = SECTIONS.get(section)
        if factory is None or not isinstance(values, dict):
            raise ConfigError(
                f"{source}: unknown section [{section}]; known sections are " + ", ".join(f"[{s}]" for s in SECTIONS)
            )
        defaults = factory()
        fields = {_toml_key(f.name): f for f in dataclasses.fields(defaults)}
        converted = {}
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"{source}: unknown key [{section}] {key}; known keys are " + ", ".join(fields))
            where = f"{source}: [{section}] {key}"
            converted[fields[key].name] = _convert(value, getattr(defaults, fields[key].name), where)
        sections[section] = dataclasses.replace(defaults, **converted)
    return _validated(Config(**sections, source=source, demo=demo))


def _convert(value: Any, default: Any, where: str) -> Any:
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, not {value!r}")
    if isinstance(default, list):
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{where} must be a list of strings, not {value!r}")
        return value
    if isinstance(default, int):
        try:
            number = int(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where} must be a whole number, not {value!r}") from None
        if number < 0 or isinstance(value, (bool, float)):
            raise ConfigError(f"{where} must be a whole number of 0 or more, not {value!r}")
        return number
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, not {value!r}")
    return value


def _validated(config: Config) -> Config:
    where = config.source
    if not config.security.secret_key and not config.demo and where.endswith("(not found)"):
        raise ConfigError(
            f"{where.removesuffix(' (not found)')}: no such configuration file; write one with "
            "`newsletter config example > config.toml` and set [security] secret_key, or pass --config PATH"
        )
    if not config.security.secret_key and not config.demo:
        raise ConfigError(
            f"{where}: [security] secret_key is empty; set it to a long random string, e.g. the "
            'output of: python -c "import secrets; print(secrets.token_urlsafe(48))"'
        )
    if len(config.security.secret_key) < MIN_SECRET_KEY and not config.demo:
        raise ConfigError(
            f"{where}: [security] secret_key is {len(config.security.secret_key)} characters, too short to keep "
            f"links from being forged; use at least {MIN_SECRET_KEY}, e.g. the output of: "
            'python -c "import secrets; print(secrets.token_urlsafe(48))"'
        )
    for key in ("base_url", "blog_url", "logo_url"):
        value = getattr(config.site, key)
        url = urlsplit(value)
        if (value or key == "base_url") and (
            url.scheme not in ("http", "https")
            or not url.hostname
            or not value.isascii()
            or len(value) > (200 if key == "base_url" else 2000)
            or any(c in value for c in " \"'<>\\")
            or has_controls(value)
        ):
            raise ConfigError(
                f"{where}: [site] {key} must be an absolute http(s) URL in ASCII (Punycode for IDN, %-escapes "
                f"for the rest) of at most {200 if key == 'base_url' else 2000} characters, not {value!r}"
            )
    if config.site.email_content not in EMAIL_CONTENT:
        raise ConfigError(
            f"{where}: [site] email_content must be one of {', '.join(EMAIL_CONTENT)}, "
            f"not {config.site.email_content!r}"
        )
    if (problem := missing_catalog(config.site.language, config.site.templates_dir)) is not None:
        raise ConfigError(f"{where}: [site] language: {problem}")
    if has_controls(config.site.description.replace("\n", " ")) or len(config.site.description) > 2000:
        raise ConfigError(f"{where}: [site] description must be plain text of at most 2000 characters")
    config = dataclasses.replace(
        config, site=dataclasses.replace(config.site, accent_color=_hex_color(config.site.accent_color, where))
    )
    if config.smtp.security not in SECURITY_MODES:
        raise ConfigError(
            f"{where}: [smtp] security must be one of {', '.join(SECURITY_MODES)}, not {config.smtp.security!r}"
        )
    if not 0 < config.smtp.port < 65536:
        raise ConfigError(f"{where}: [smtp] port must be between 1 and 65535, not {config.smtp.port}")
    if config.smtp.connections < 1 or config.smtp.batch_size < 1:
        raise ConfigError(f"{where}: [smtp] connections and batch_size must be at least 1")
    name, addr = parseaddr(config.smtp.from_)
    if has_controls(config.smtp.from_) or "=?" in config.smtp.from_:
        raise ConfigError(f"{where}: [smtp] from must be one line of plain text")
    try:
        validate_email(addr, check_deliverability=False, allow_smtputf8=False)
    except EmailNotValidError as exc:
        raise ConfigError(f'{where}: [smtp] from must be an address like "Blog <news@example.com>" ({exc})') from None
    if config.bounces.address:
        try:
            validate_email(config.bounces.address, check_deliverability=False, allow_smtputf8=False)
        except EmailNotValidError as exc:
            raise ConfigError(
                f'{where}: [bounces] address must be an address like "bounces@news.example.com" ({exc})'
            ) from None
        if "+" in config.bounces.local_part:
            raise ConfigError(f"{where}: [bounces] address must have no + in it: its token is added after a +")
    if has_controls(config.site.name) or "=?" in config.site.name:
        raise ConfigError(f"{where}: [site] name must be one line of plain text")
    try:
        parse_many(config.web.rate_limit)
    except ValueError:
        raise ConfigError(
            f'{where}: [web] rate_limit must read like "10 per hour" or "5/minute; 20/day", '
            f"not {config.web.rate_limit!r}"
        ) from None
    weekday = config.digest.weekday.lower()  # "Monday" as well as "monday"
    config = dataclasses.replace(config, digest=dataclasses.replace(config.digest, weekday=weekday))
    _validate_digest(config.digest, where)
    if config.database.url.split(":", 1)[0].split("+")[0] not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"{where}: [database] url must start with sqlite:/// or postgresql+psycopg://, "
            f"not {hide_password(config.database.url)!r}"
        )
    return config


def _hex_color(value: str, where: str) -> str:
    """VALUE, any opaque CSS colour ("#1f5fbf", "teal", "rgb(31 95 191)", "hsl(…)"), as #rrggbb."""
    color = tinycss2.color4.parse_color(value.strip()) if value.strip() else None
    try:
        srgb = color.to("srgb") if isinstance(color, tinycss2.color4.Color) else None
    except NotImplementedError:
        srgb = None
    if srgb is None or srgb.alpha != 1:
        raise ConfigError(
            f'{where}: [site] accent_color must be an opaque CSS colour such as "#1f5fbf", "teal" or '
            f'"rgb(31 95 191)", not {value!r}'
        )
    return "#" + "".join(f"{round(min(max(c, 0), 1) * 255):02x}" for c in srgb.coordinates)


def _validate_digest(digest: DigestConfig, where: str) -> None:
    if digest.default_frequency not in FREQUENCIES:
        raise ConfigError(
            f"{where}: [digest] default_frequency must be one of {', '.join(FREQUENCIES)}, "
            f"not {digest.default_frequency!r}"
        )
    if digest.send_hour > 23:
        raise ConfigError(f"{where}: [digest] send_hour must be an hour from 0 to 23, not {digest.send_hour}")
    if digest.weekday not in WEEKDAYS:
        raise ConfigError(f"{where}: [digest] weekday must be one of {', '.join(WEEKDAYS)}, not {digest.weekday!r}")
    try:
        ZoneInfo(digest.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"{where}: [digest] timezone must be an IANA time zone name such as Europe/Paris or UTC, "
            f"not {digest.timezone!r}"
        ) from None
