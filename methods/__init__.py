"""Built-in methods, one module each. Each module defines a :class:`fcl_bench.api.Method` subclass
registered with :func:`fcl_bench.registry.register`."""
