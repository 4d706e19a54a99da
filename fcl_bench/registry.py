"""Method registry: built-in methods (``fcl_bench.methods``), installed plugins (entry-point group
``fcl_bench.methods``) and plugin files (``--plugin path/to/file.py``).

A method is a :class:`fcl_bench.api.Method` subclass with a unique ``name``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from importlib.metadata import entry_points
from pathlib import Path

from fcl_bench.api import Method

BUILTIN_MODULES = ["fedavg", "fedprox", "fedvit", "l2p", "dualprompt", "fedlscl"]
ENTRY_POINT_GROUP = "fcl_bench.methods"


class RegistryError(ValueError):
    """Unknown or malformed method."""


_REGISTRY: dict[str, type[Method]] = {}
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
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise RegistryError(f"two methods are named '{name}': {existing.__module__} and {cls.__module__}")
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
        obj = ep.load()
        if inspect.isclass(obj) and issubclass(obj, Method):
            register(obj)
        elif inspect.ismodule(obj):
            _register_module_methods(obj)
        else:
            raise RegistryError(f"entry point '{ep.name}' ({ep.value}) is neither a Method class nor a module")


def _register_module_methods(module) -> list[str]:
    names = []
    for _, obj in inspect.getmembers(module, inspect.isclass):
        if issubclass(obj, Method) and obj is not Method and obj.__module__ == module.__name__ and \
                isinstance(getattr(obj, "name", None), str):
            register(obj)
            names.append(obj.name)
    return names


def load_plugin_file(path: str | Path) -> list[str]:
    """Import a Python file and register every Method subclass defined in it."""
    path = Path(path)
    if not path.is_file():
        raise RegistryError(f"--plugin: no file at {path}")
    mod_name = f"fcl_bench_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    names = _register_module_methods(module)
    if not names:
        raise RegistryError(f"--plugin {path}: defines no fcl_bench.api.Method subclass with a 'name'")
    return names


def available_methods() -> list[str]:
    _load_builtins_and_plugins()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    _load_builtins_and_plugins()
    if name not in _REGISTRY:
        raise RegistryError(f"unknown method '{name}'; valid methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
