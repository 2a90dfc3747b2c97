"""The documentation site builds strictly, its reference pages come from the code, and the Korean quick starts
tell the reader to run the same commands with the same flags as the English ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs.commands import commands_and_flags

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    quiet = {"NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}  # Material's banner about MkDocs 2.0
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                           capture_output=True, text=True, env={**os.environ, **quiet})
    assert built.returncode == 0, built.stderr[-4000:]
    return out


def test_the_site_builds_strict_with_a_page_per_role_and_the_readme_as_its_home(site: Path) -> None:
    for page in ("anchor", "plant", "data-scientist", "reference/run-config", "reference/node-config", "reference/cli", "ko/plant-quickstart"):
        assert (site / page / "index.html").is_file(), page
    assert "Two commands" in (site / "index.html").read_text(encoding="utf-8")


def test_reference_pages_list_every_key_and_command_the_code_has(site: Path) -> None:
    import typer
    import typer.core

    from fl_client.config import PlantConfig
    from fl_server.run.config import RunConfig
    from launcher.cli import app

    run_config = (site / "reference/run-config/index.html").read_text(encoding="utf-8")
    assert all(f"<code>{name.replace('_', '-')}</code>" in run_config for name in RunConfig.model_fields)
    node_config = (site / "reference/node-config/index.html").read_text(encoding="utf-8")
    assert all(f"<code>{name.replace('_', '-')}</code>" in node_config for name in PlantConfig.model_fields)
    assert "how much privacy budget" not in run_config  # no hand-written text: what is there comes from the source
    cli = (site / "reference/cli/index.html").read_text(encoding="utf-8")
    group = typer.main.get_command(app)
    assert all(f"maxfl {name}" in cli for name in group.list_commands(None))  # type: ignore[attr-defined, arg-type]
    assert "--repair-from-journal" in cli and "--node-config" in cli


@pytest.mark.parametrize(("english", "korean"), [("plant.md", "ko/plant-quickstart.md"), ("anchor.md", "ko/anchor-quickstart.md")])
def test_the_korean_quick_starts_name_the_same_commands_and_flags(english: str, korean: str) -> None:
    en, ko = (commands_and_flags((DOCS / page).read_text(encoding="utf-8")) for page in (english, korean))
    assert en, english
    assert ko == en, f"only in {english}: {sorted(en - ko)}; only in {korean}: {sorted(ko - en)}"


def test_the_korean_join_kit_page_names_the_commands_of_the_kit_readme() -> None:
    en = commands_and_flags((DOCS / "ko" / "join-kit.md").read_text(encoding="utf-8"))
    assert {"maxfl plant join", "maxfl plant join --check", "maxfl plant join --kit", "maxfl plant keygen"} <= en
