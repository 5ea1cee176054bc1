"""The systemd units in deploy/ are valid for systemd itself, pointing at a real `newsletter`."""

from __future__ import annotations

import getpass
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNITS = ["newsletter.service", "newsletter-send.service", "newsletter-send.timer"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_verifies_the_units_without_a_warning(tmp_path: Path) -> None:
    executable = shutil.which("newsletter")
    assert executable, "the package is installed with its console script"
    user = getpass.getuser()
    for name in UNITS:  # the documented layout, with this machine's program and user
        text = (DEPLOY / name).read_text()
        text = text.replace("/srv/newsletter/venv/bin/newsletter", executable)
        text = text.replace("User=newsletter", f"User={user}").replace("Group=newsletter", f"Group={user}")
        (tmp_path / name).write_text(text)
    verified = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / name) for name in UNITS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verified.returncode == 0 and verified.stderr == "", verified.stderr
