"""Method registry: built-in methods (``fcl_bench.methods``), installed plugins (entry-point group
``fcl_bench.methods``) and plugin files (``--plugin path/to/file.py``).

A method is a :class:`fcl_bench.api.Method` subclass with a unique ``name``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import traceback
import warnings
from importlib.metadata import entry_points
from pathlib import Path

from fcl_bench.api import Method
from fcl_bench.paths import PathError, check_token

BUILTIN_MODULES = ["fedavg", "fedprox", "fedvit", "l2p", "dualprompt", "fedlscl", "target", "mfcl"]
ENTRY_POINT_GROUP = "fcl_bench.methods"


class RegistryError(ValueError):
    """Unknown or malformed method."""


_REGISTRY: dict[str, type[Method]] = {}
_BROKEN: dict[str, str] = {}  # entry-point name -> why it did not load
_LOADED = False


def register(cls: type[Method]) -> type[Method]:
    """Class decorator (or call) adding a Method subclass to the registry."""
    if not (inspect.isclass(cls) and issubclass(cls, Method)):
        raise RegistryError(f"{cls!r} is not a fcl_bench.api.Method subclass")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise RegistryError(f"method class {cls.__name__} needs a non-empty string 'name'")
    if "." in name or "," in name or "=" in name:
        raise RegistryError(f"method name '{name}' may not contain '.', ',' or '='")
    try:  # the name becomes a results folder
        check_token(name, "method name")
    except PathError as e:
        raise RegistryError(f"method class {cls.__name__}: {e}") from None
    existing = _REGISTRY.get(name)
    # the same class loaded again (a plugin file imported twice) replaces itself; another class may not
    same = existing is not None and (existing.__module__, existing.__qualname__) == (cls.__module__, cls.__qualname__)
    if existing is not None and existing is not cls and not same:
        raise RegistryError(f"two methods are named '{name}': {existing.__module__}.{existing.__qualname__} and "
                            f"{cls.__module__}.{cls.__qualname__}; rename one")
    _REGISTRY[name] = cls
    return cls


def _load_builtins_and_plugins() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for mod in BUILTIN_MODULES:
        try:
            importlib.import_module(f"fcl_bench.methods.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"fcl_bench.methods.{mod}":
                raise
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
            if inspect.isclass(obj) and issubclass(obj, Method):
                register(obj)
            elif inspect.ismodule(obj):
                _register_module_methods(obj)
            else:
                raise RegistryError("it is neither a fcl_bench.api.Method subclass nor a module")
        except Exception as e:  # one broken plugin must not break every other method
            dist = getattr(getattr(ep, "dist", None), "name", "?")
            _BROKEN[ep.name] = (f"entry point '{ep.name}' = '{ep.value}' (package {dist}) failed to load: "
                                f"{_describe(e)}")
            warnings.warn(_BROKEN[ep.name], stacklevel=2)


def _describe(e: BaseException) -> str:
    """``Type: message (at file:line)`` of the innermost frame, so a plugin author finds the line."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""
    return f"{type(e).__name__}: {e}{where}"


def _register_module_methods(module) -> list[str]:
    names = []
    for _, obj in inspect.getmembers(module, inspect.isclass):
        # only classes that name themselves: a helper base class inherits its parent's name
        if issubclass(obj, Method) and obj is not Method and obj.__module__ == module.__name__ and \
                isinstance(obj.__dict__.get("name"), str):
            register(obj)
            names.append(obj.name)
    return names


_PLUGIN_FILES: dict[tuple[str, int, int], list[str]] = {}  # (path, mtime, size) -> names it registered


def load_plugin_file(path: str | Path) -> list[str]:
    """Import a Python file and register every Method subclass defined in it (once per process for an
    unchanged file: every run of a plan names the same plugins)."""
    path = Path(path)
    if not path.is_file():
        raise RegistryError(f"--plugin: no file at {path}")
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key in _PLUGIN_FILES and all(n in _REGISTRY for n in _PLUGIN_FILES[key]):
        return list(_PLUGIN_FILES[key])
    mod_name = f"fcl_bench_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise RegistryError(f"--plugin {path}: not a Python source file; give a .py file defining Method "
                            "subclasses")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        raise RegistryError(f"--plugin {path} failed to import: {_describe(e)}") from e
    names = _register_module_methods(module)
    if not names:
        raise RegistryError(f"--plugin {path}: defines no fcl_bench.api.Method subclass with a 'name'")
    _PLUGIN_FILES[key] = list(names)
    return names


def available_methods() -> list[str]:
    _load_builtins_and_plugins()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    _load_builtins_and_plugins()
    if name not in _REGISTRY and name in _BROKEN:
        raise RegistryError(_BROKEN[name])
    if name not in _REGISTRY:
        raise RegistryError(f"unknown method '{name}'; valid methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
