"""`featcache`: stage 1 (weights, manifests, splits, synthetic cohort, extraction, probes, results) and the study
(init, plan, run, report)."""

from __future__ import annotations

from cli import backbones_cmds, image_cmds, manifest_cmds, probe_cmds, protocol_cmds, store_cmds, study_cmds
from cli._common import new_app, register_all, run_app

app = new_app("Stage 1: embed chest X-rays once per frozen backbone, then probe and few-shot on cached features.",
              name="featcache")
register_all(
    app,
    backbones_cmds.register,
    image_cmds.register,
    manifest_cmds.register,
    protocol_cmds.register,
    store_cmds.register,
    probe_cmds.register,
    study_cmds.register,
)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
