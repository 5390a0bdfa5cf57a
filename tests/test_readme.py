"""The README's runnable path, as written: its marked command block in an empty folder, then every python snippet."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.adapters_app import app as adapters_app
from cli.featcache_app import app as featcache_app

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- runs offline: tests/test_readme.py -->"
APPS = {"featcache": featcache_app, "adapters": adapters_app}


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def _marked_commands(text: str) -> list[list[str]]:
    """The commands of the bash block right after the marker, comments stripped."""
    after = text.split(MARKER, 1)[1]
    block = _blocks(after, "bash")[0]
    assert after.lstrip().startswith("```bash"), "the marker must sit right above its block"
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.split("#")[0].strip()]


def test_readme_commands_and_snippets_run_as_written(tmp_path, monkeypatch):
    text = README.read_text()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEATCACHE_WEIGHTS", str(tmp_path / "no-weights"))  # nothing here needs real weights
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    commands = _marked_commands(text)
    assert [c[0] for c in commands][:1] == ["featcache"] and len(commands) >= 5
    for argv in commands:
        result = CliRunner().invoke(APPS[argv[0]], argv[1:])
        assert result.exit_code == 0, f"{shlex.join(argv)}\n{result.output}\n{result.exception!r}"
    snippets = _blocks(text, "python")
    assert snippets
    for snippet in snippets:
        namespace: dict = {}
        exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
        if "X" in namespace:
            assert len(namespace["ids"]) == len(namespace["X"]) > 0


@pytest.mark.parametrize("command", ["featcache", "adapters"])
def test_readme_names_only_existing_verbs(command):
    """Every `featcache VERB` / `adapters VERB` the README mentions is a real command."""
    verbs = set(re.findall(rf"\b{command} ([a-z][a-z-]+)", README.read_text())) - {"and", "or", "is", "with"}
    help_text = CliRunner().invoke(APPS[command], ["--help"], env={"COLUMNS": "200"}).output
    listed = {line.split()[1] for line in help_text.splitlines() if line.startswith("│ ") and len(line.split()) > 1}
    assert verbs <= listed, verbs - listed


def _command_params(command: str) -> set[str]:
    """Option names of a command of either app (by its name in a study file's `defaults:`)."""
    from typer.main import get_command

    for app in APPS.values():
        group = get_command(app)
        found = group.commands.get(command) if hasattr(group, "commands") else None
        if found is not None:
            return {p.name for p in found.params}
    raise AssertionError(f"no command {command!r}")


def test_readme_study_files_load(tmp_path):
    """Every yaml block of the README is a study file that loads, with its grid and its `defaults:` options."""
    from study.studyfile import load_study

    blocks = _blocks(README.read_text(), "yaml")
    assert blocks
    for i, block in enumerate(blocks):
        path = tmp_path / f"s{i}" / "study.yaml"
        path.parent.mkdir()
        path.write_text(block)
        study = load_study(path)
        if study.grid_ref is not None:
            assert study.grid().backbones
        for command, options in study.defaults.items():
            assert set(options) <= _command_params(command), (command, options)
