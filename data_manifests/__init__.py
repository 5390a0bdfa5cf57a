"""The shipped dataset specs (``*.yaml``) and study grids (``grids/*.yaml``), as package data.

A package only so that a wheel carries them; read them through :func:`featcache.datasets.data_dir`.
"""
