"""newsletter: email subscriptions for a blog."""

from .app import create_app
from .config import Config, load_config

__all__ = ["Config", "create_app", "load_config"]
