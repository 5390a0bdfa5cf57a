"""`featcache report` on a hand-made record set whose table values are known."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

import study.report as report_module
from cli.featcache_app import app as featcache_app
from featcache.errors import RecordError
from featcache.records import HEAD_COUNT, RunRecord, write_record
from study.report import write_report

PRETRAINED = "hf:timm/resnet18@abc/model.safetensors"


def _record(backbone: str, method: str, fold: int, mcc: float, ap: float, *, weights: str = PRETRAINED,
            regime: str = "full", shots: int | None = None, draw: int | None = None, options: dict | None = None,
            val_loss: float | None = None, wall: float = 1.0, trainable: int = 513, total: int = 513,
            support_from: str | None = "train") -> RunRecord:
    rng = np.random.default_rng(fold)
    ids = [f"{fold}-{i}" for i in range(8)]
    return RunRecord(
        task="AFC", backbone=backbone, method=method, fold=f"fold{fold}", seed=42, options=options or {},
        regime=regime, shots=shots, draw=draw, identity=weights, test_ids=ids, test_labels=[0, 1] * 4,
        test_scores=rng.random(8).tolist(), test_patients=ids,
        metrics={"mcc_val_thr": mcc if regime == "full" else None, "mcc": mcc, "average_precision": ap,
                 "val_threshold": 0.4 if regime == "full" else None},
        support_from=None if regime == "full" else support_from,
        wall_time_s=wall, trainable_params=trainable, total_params=total,
        provenance={"weights": weights, "head_count": HEAD_COUNT},  # counted as the trainer counts (one logit)
        training={} if val_loss is None else {"val_loss": val_loss, "best_epoch": 3},
    )


@pytest.fixture
def records(tmp_path):
    folder = tmp_path / "runs"
    made = [
        _record("resnet18", "probe", 0, 0.2, 0.6, wall=0.5), _record("resnet18", "probe", 1, 0.4, 0.8, wall=0.5),
        # end-to-end LP: head LR 1e-3 has the lower validation loss and is kept, though 1e-2 scores higher on test
        *(_record("resnet18", "lp", f, m, 0.7, options={"head_lr": 1e-3}, val_loss=0.5, wall=50.0,
                  total=11_000_000) for f, m in ((0, 0.5), (1, 0.7))),
        *(_record("resnet18", "lp", f, 0.9, 0.9, options={"head_lr": 1e-2}, val_loss=0.9, wall=50.0,
                  total=11_000_000) for f in (0, 1)),
        *(_record("resnet18", "lora", f, 0.3, 0.7, options={"head_lr": 1e-3, "rank": 8}, val_loss=0.4,
                  trainable=90_000, total=11_090_000) for f in (0, 1)),
        *(_record("dinov2-s", "probe", f, 0.1, 0.5, weights="random-init") for f in (0, 1)),
        *(_record("resnet18", "probe", f, 0.1 * k, 0.5, regime="fewshot", shots=k, draw=d)
          for f in (0, 1) for k in (2, 4, 8) for d in range(3)),
        # made before the rule was recorded: the old rule (support from train + val), never pooled with these
        _record("resnet18", "probe", 0, 0.9, 0.9, regime="fewshot", shots=2, draw=3, support_from=None),
    ]
    for record in made:
        write_record(record, folder)
    return folder


def _row(markdown: str, *cells: str) -> str:
    return next(line for line in markdown.splitlines() if all(f"| {c} |" in line for c in cells))


def test_report_tables_hold_the_known_numbers(records, tmp_path, monkeypatch):
    titles: list[str] = []
    real_save = report_module._save

    def keep_titles(fig, path):
        titles.extend(t for t in [getattr(fig, "_suptitle", None) and fig._suptitle.get_text(),
                                  *(ax.get_title() for ax in fig.axes)] if t)
        return real_save(fig, path)

    monkeypatch.setattr(report_module, "_save", keep_titles)
    made = write_report(records, tmp_path / "report")
    text = made.markdown.read_text()
    assert _row(text, "resnet18", "probe").split(" | ")[4:6] == ["0.300 ± 0.141", "0.700 ± 0.141"]
    lp = _row(text, "resnet18", "lp")
    assert "| 0.001 |" in lp and "0.600 ± 0.141" in lp and "0.9" not in lp.split(" | ")[4]
    assert "| lora-r8 |" in _row(text, "resnet18", "lora-r8")
    assert "random weights" in _row(text, "dinov2-s *(random weights)*", "probe")
    assert "AFC resnet18 lp full: head LR 0.001 by mean validation loss" in text
    assert _row(text, "AFC", "resnet18").endswith("| 100× | – |")  # LP 50 s against the probe's 0.5 s per run
    assert "| 1 (cached probe) | 23 | 2 |" in text and "| 2 (trained end to end) | 6 | 0 |" in text
    assert len(made.figures) == 3 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in made.figures)
    for figure in made.figures:
        assert f"]({figure.relative_to(made.markdown.parent)})" in text
    marked = {t.split(":")[1].split(",")[0].strip(): "(random weights)" in t for t in titles if t.startswith("AFC")}
    # the full-data figures hold dinov2-s's random-weight runs; the few-shot one has pretrained runs only
    assert marked == {"MCC per method": True, "MCC against trainable share": True,
                      "few-shot MCC (validation threshold) against k": False}
    assert "18 runs without one at 0.5" in " ".join(titles)  # these hand-made few-shot runs have no threshold
    assert "1 few-shot runs of AFC were made under the old rule" in text


def test_report_share_plot_places_the_probe_on_its_backbone(records):
    from featcache.records import load_records

    points, missing = report_module.share_points([r for r in load_records(records) if r.regime == "full"])
    shares = {(m, b): s for m, b, s, _ in points}
    assert shares["probe", "resnet18"] == pytest.approx(513 / 11_000_000)
    assert shares["lora-r8", "resnet18"] == pytest.approx(90_000 / 11_090_000)
    assert missing == ["probe on dinov2-s"]  # no trained run of dinov2-s gives its size


def test_report_command_and_refusals(records, tmp_path):
    result = CliRunner().invoke(featcache_app, ["report", "--results", str(records), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "report.md").is_file() and (tmp_path / "r" / "figures" / "AFC_fewshot.png").is_file()
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecordError, match="no run records"):
        write_report(tmp_path / "empty", tmp_path / "r2")


def test_compute_table_shows_both_lp_paths():
    """LP records trained on images and on stored features are counted apart, each against the probe."""
    made = [_record("resnet18", "probe", f, 0.2, 0.6, wall=0.5) for f in (0, 1)]
    made += [_record("resnet18", "lp", f, 0.5, 0.7, wall=50.0) for f in (0, 1)]
    for f in (0, 1):
        record = _record("resnet18", "lp", f, 0.5, 0.7, wall=0.05)
        record.provenance["trained_on"] = "features"
        made.append(record)
    stages, ratios = report_module.compute_table(made)
    assert [row[:2] for row in stages] == [["1 (cached probe)", "2"], ["2 (LP on stored features)", "2"],
                                           ["2 (trained end to end)", "2"]]
    assert ratios == [["AFC", "resnet18", "0.50 s", "50.00 s", "0.05 s", "100×", "0.1×"]]
