"""The two console scripts: verbs, --version, help, messages, and output on a terminal and in a log file."""

from __future__ import annotations

import io

import pytest
from rich.table import Table
from typer.testing import CliRunner

import cli.console as common
from cli._common import run_app
from cli.adapters_app import app as adapters_app
from cli.console import make_console, plain_output, progress
from cli.featcache_app import app as featcache_app
from featcache.backbones import BACKBONES

FEATCACHE_VERBS = ("models", "weights", "show", "synth", "datasets", "manifest", "splits", "results", "extract",
                   "pixels", "export", "stores", "probe")


def test_featcache_help_lists_its_verbs():
    result = CliRunner().invoke(featcache_app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for verb in FEATCACHE_VERBS:
        assert f" {verb} " in result.output, verb


def test_adapters_help_lists_its_verbs():
    result = CliRunner().invoke(adapters_app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and " methods " in result.output


def test_weights_names_all_eleven_with_status(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATCACHE_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "weights" / "medclip-vit").mkdir(parents=True)
    (tmp_path / "weights" / "medclip-vit" / "pytorch_model.bin").write_bytes(b"x")
    result = CliRunner().invoke(featcache_app, ["weights"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.split()
             and line.split()[0] in BACKBONES}  # off a terminal: a table without box rules
    assert set(lines) == set(BACKBONES)
    assert "found" in lines["medclip-vit"] and "medclip-vit/pytorch_model.bin" in lines["medclip-vit"]
    assert "missing" in lines["dinov2-s"] and "facebook/dinov2-small" in lines["dinov2-s"]


def test_models_lists_the_registry():
    result = CliRunner().invoke(featcache_app, ["models"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    assert all(name in result.output for name in BACKBONES)


# Output off a terminal (logs, `| tee`) and on one; --version; flag help; messages in the user's words.


class _Clock:
    """A settable stand-in for time.monotonic, so progress pacing is tested without waiting."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = _Clock()
    monkeypatch.setattr(common.time, "monotonic", fake)
    return fake


def test_plain_console_writes_whole_lines_without_codes():
    out = io.StringIO()
    plain = make_console(plain=True, file=out)
    sentence = "store " + "features.zarr/dinov2-s/0123456789abcdef " * 8 + "end"
    plain.print(f"[yellow]{sentence}[/]")
    table = Table(title="groups")
    table.add_column("group", overflow="fold")
    table.add_row("a-rather-long-backbone-name/" + "f" * 120)
    plain.print(table)
    text = out.getvalue()
    assert "\x1b" not in text and "[yellow]" not in text
    assert sentence + "\n" in text  # one line, not wrapped at 80 columns
    assert "a-rather-long-backbone-name/" + "f" * 120 in text  # a group name is never split over lines


def test_plain_mode_follows_the_stream_and_the_env(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv(common.PLAIN_ENV, raising=False)
    assert plain_output(io.StringIO()) and not plain_output(Tty())
    monkeypatch.setenv(common.PLAIN_ENV, "1")
    assert plain_output(Tty())
    monkeypatch.setenv(common.PLAIN_ENV, "0")
    assert not plain_output(io.StringIO())


def test_plain_progress_paces_its_lines(clock):
    out = io.StringIO()
    with progress("training", out=make_console(plain=True, file=out), every=10) as update:
        for epoch in range(1, 41):  # one epoch a second
            clock.now += 1
            update(epoch, 1000, status=f"epoch {epoch}/1000 val loss 0.41")
    lines = out.getvalue().splitlines()
    assert lines[0] == "training: 1/1000 · epoch 1/1000 val loss 0.41"
    assert len(lines) == 2 + 3  # the first, one per 10 s (at 11, 21, 31 s), the last
    assert lines[1] == "training: 11/1000 · 1.0 items/s · ETA 16m29s · epoch 11/1000 val loss 0.41"
    assert lines[-1] == "training: 40/1000 · took 40s, 1.0 items/s · epoch 40/1000 val loss 0.41"
    assert max(map(len, lines)) <= 80


def test_plain_progress_slow_items_and_unknown_total(clock):
    out = io.StringIO()
    with progress("embedding", out=make_console(plain=True, file=out), every=5) as update:
        update(0)
        clock.now += 20
        update(1)
    lines = out.getvalue().splitlines()
    assert lines == ["embedding: 0/?", "embedding: 1/? · 20.0 s/item · elapsed 20s",
                     "embedding: 1/? · took 20s, 20.0 s/item"]


def test_progress_disabled_and_failed_runs_print_nothing_more(clock):
    out = io.StringIO()
    with progress("embedding", out=make_console(plain=True, file=out), enabled=False) as update:
        update(1, 2)
    with pytest.raises(RuntimeError), progress("embedding", out=make_console(plain=True, file=out)) as update:
        update(1, 2)
        raise RuntimeError("stop")
    assert out.getvalue() == "embedding: 1/2 (50%)\n"  # no "done" line after a failure


def test_terminal_progress_is_a_rich_bar():
    out = io.StringIO()
    terminal = make_console(plain=False, file=out)
    assert terminal.is_terminal
    with progress("embedding", out=terminal) as update:
        update(3, 10, status="fold 2")
    text = out.getvalue()
    assert "\x1b[" in text and "embedding" in text and "3/10" in text and "fold 2" in text
    assert "embedding: 3/10" not in text  # not the plain line


def test_extract_off_a_terminal_prints_progress_lines_and_whole_report(synth_cohort, tmp_path):
    manifest = synth_cohort(patients=6, size=64)
    store = tmp_path / ("a-long-store-name-" * 6 + ".zarr")
    result = CliRunner().invoke(featcache_app, ["extract", "--model", "resnet18-tiny", "--manifest", str(manifest),
                                                "--workers", "0", "--store", str(store)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("embedding: 0/") and "took" in lines[-2] and "images/s" in lines[-2]
    assert lines[-1].startswith(f"{store}/resnet18-tiny/")  # one whole line
    assert "images," in lines[-1] and "\x1b" not in result.output


@pytest.mark.parametrize(("app", "name"), [(featcache_app, "featcache"), (adapters_app, "adapters")])
def test_version(app, name):
    from featcache import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"{name} {__version__}\n"


@pytest.mark.parametrize("command", [["probe"], ["extract"], ["splits"], ["manifest", "validate"]])
def test_flags_show_no_type_in_help(command):
    result = CliRunner().invoke(featcache_app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "<bool>" not in result.output
    assert "<path>" in result.output  # options with values still show theirs


def test_messages_name_the_option_and_count_in_words(synth_cohort, tmp_path):
    result = CliRunner().invoke(featcache_app, ["synth", "--out", str(tmp_path), "--format", "jpg"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "--format" in result.output and "fmt" not in result.output
    assert common.plural(1, "error") == "1 error" and common.plural(2, "patch", "patches") == "2 patches"
    manifest = synth_cohort(patients=2, size=64, centers=1, to=tmp_path / "cohort")
    next((tmp_path / "cohort" / "images").rglob("*.png")).unlink()  # one missing file: one error
    result = CliRunner().invoke(featcache_app, ["manifest", "validate", str(manifest)])
    assert result.exit_code != 0 and ": 1 error (missing_file)" in str(result.exception)


def test_adapters_methods_needs_no_weights(tmp_path, monkeypatch):
    """The README's `adapters methods --model dinov2-s` runs with no weights on the machine (meta device), and
    its counts are those of a real build."""
    import copy

    from adapters.classifier import Classifier
    from adapters.methods import apply_method
    from featcache.backbones import build_backbone, count_parameters

    monkeypatch.setenv("FEATCACHE_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    result = CliRunner().invoke(adapters_app, ["methods", "--model", "dinov2-s"])
    assert result.exit_code == 0, result.output
    assert "architecture only" in result.output and "q_proj k_proj v_proj fc1 fc2" in result.output
    tiny = CliRunner().invoke(adapters_app, ["methods", "--model", "dinov2-s-tiny", "--rank", "4"])
    base = Classifier(build_backbone("dinov2-s-tiny"))
    for method in ("lora", "vera", "bitfit", "ia3", "lp"):
        adapted = apply_method(copy.deepcopy(base), method, 4 if method in ("lora", "vera") else None)
        trainable, _ = count_parameters(adapted)
        row = next(line for line in tiny.output.splitlines() if line.startswith(f"{method} "))
        assert f"{trainable:,}" in row, (method, row)


@pytest.mark.parametrize(("argv", "start"), [
    (["synth", "--out", "x", "--format", "jpg"], "error: Invalid value for --format: 'jpg': choose from png"),
    (["probe", "--model", "x"], "error: Missing option '--task'; see `"),
    (["nosuch"], "error: No such command 'nosuch'"),
    (["synth", "--out", "x", "--patients", "2"], "error: Invalid value for --centers: 3 centers need at least"),
    (["synth", "--out", "x", "--images-per-patient", "3", "1"], "error: Invalid value for --images-per-patient"),
])
def test_usage_errors_are_one_line(argv, start, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["featcache", *argv])
    with pytest.raises(SystemExit) as done:
        run_app(featcache_app)
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.startswith(start) and err.count("\n") == 1, err
    assert err.rstrip().endswith(" --help`")
