"""fcl-bench: a benchmark suite for Federated Continual Learning with foundation models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fcl-bench")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
