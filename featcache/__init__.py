"""featcache: embed chest X-rays once per frozen backbone, then probe, few-shot and compare cheaply."""

__version__ = "0.1.0"
