"""Thin Typer entry points: parse, call the library, print, exit code. Nothing imports ``cli``."""
