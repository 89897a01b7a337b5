"""The docs stay as true as the code: every setting is documented, the README's commands exist."""

from __future__ import annotations

from pathlib import Path

from parley.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_is_in_the_configuration_reference() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"`PARLEY_{name.upper()}`" not in readme]
    assert missing == []


def test_readme_documented_settings_all_exist() -> None:
    import re

    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `PARLEY_([A-Z0-9_]+)`", readme, flags=re.MULTILINE))
    assert documented == {name.upper() for name in Settings.model_fields}


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/test.sh" in ci
