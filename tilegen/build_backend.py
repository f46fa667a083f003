"""A PEP 517 build backend for projects that ship tilegen ops: setuptools, after `tilegen generate`.

Why a setuptools wrapper and not scikit-build-core with a CMake `tilegen_add_ops()`: tilegen already
owns the build of an op (one set of nvcc flags, ninja, provenance in build.json, incremental by
content); CMake would repeat the flags and the NVSHMEM/TVM-FFI lookup in a second language. Like
FlashInfer's in-tree AOT backend, this module generates and builds first and then lets setuptools
pack the wheel, which it marks platform-specific (it holds GPU libraries) and into which it puts
the ops' libraries, manifests and provenance (tilegen.core.project.PACKAGE_DATA). Configuration: the
project's [tool.tilegen] table (tilegen.core.project).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from setuptools import build_meta as _setuptools

from .core.project import PACKAGE_DATA, generate, read_config


def _sources_only() -> None:
    """Every setuptools hook runs egg_info, which needs the ops package to exist: write its sources
    (no build yet). pip calls get_requires_for_build_wheel first under build isolation (its default),
    prepare_metadata_* first without it, so each hook does this."""
    cfg = read_config(Path("pyproject.toml"))
    if cfg is not None:
        generate(cfg, build=False)


def get_requires_for_build_wheel(config_settings=None):
    _sources_only()
    return _setuptools.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings=None):
    _sources_only()
    return _setuptools.get_requires_for_build_editable(config_settings)


def get_requires_for_build_sdist(config_settings=None):
    _sources_only()
    return _setuptools.get_requires_for_build_sdist(config_settings)


@contextmanager
def _specs_in_the_sdist():
    """An sdist must carry the specs (and the config naming them), not only the packages: a wheel
    built from it generates its ops from them."""
    cfg = read_config(Path("pyproject.toml"))
    if cfg is None:
        yield
        return
    from setuptools.command.sdist import sdist

    from .core.spec_files import find_spec_files
    files = sorted(str(f.resolve().relative_to(cfg.root)) for f in find_spec_files([cfg.root / s for s in cfg.specs]))
    saved = sdist.add_defaults

    def add_defaults(self):
        saved(self)
        self.filelist.extend(files)

    sdist.add_defaults = add_defaults
    try:
        yield
    finally:
        sdist.add_defaults = saved


def build_sdist(sdist_directory, config_settings=None):
    _sources_only()
    with _specs_in_the_sdist():
        return _setuptools.build_sdist(sdist_directory, config_settings)


@contextmanager
def _ops_in_the_wheel():
    """Generate and build the ops, then have setuptools pack them as a platform wheel."""
    cfg = read_config(Path("pyproject.toml"))
    if cfg is None:
        yield
        return
    generate(cfg)
    from setuptools.command.build_py import build_py
    from setuptools.dist import Distribution
    try:
        from setuptools.command.bdist_wheel import bdist_wheel
    except ImportError:  # setuptools < 70.1
        from wheel.bdist_wheel import bdist_wheel

    saved = (Distribution.has_ext_modules, build_py.finalize_options, bdist_wheel.get_tag)

    def finalize_options(self):
        saved[1](self)
        self.package_data = dict(self.package_data or {})
        self.package_data[cfg.package_name] = list(self.package_data.get(cfg.package_name, [])) + PACKAGE_DATA

    def get_tag(self):  # the libraries talk C (TVM-FFI) to Python: any CPython 3, this platform
        return ("py3", "none", saved[2](self)[2])

    Distribution.has_ext_modules = lambda self: True  # GPU libraries: not a pure-Python wheel
    build_py.finalize_options = finalize_options
    bdist_wheel.get_tag = get_tag
    try:
        yield
    finally:
        Distribution.has_ext_modules, build_py.finalize_options, bdist_wheel.get_tag = saved


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    with _ops_in_the_wheel():
        return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    with _ops_in_the_wheel():
        return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    _sources_only()
    return _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    _sources_only()
    return _setuptools.prepare_metadata_for_build_editable(metadata_directory, config_settings)
