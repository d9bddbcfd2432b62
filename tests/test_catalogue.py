"""docs/losses.md is generated from the loss configs and classes, and is current."""

import subprocess
import sys

from conftest import REPO


def test_catalogue_is_current_and_lists_every_loss():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "catalogue.py"), "--check"], capture_output=True,
                          text=True, cwd=REPO)  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = (REPO / "docs" / "losses.md").read_text()
    for config in (REPO / "configs" / "loss").glob("*.yaml"):
        assert f"| {config.stem} |" in text
