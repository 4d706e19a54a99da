"""fcl-bench: a benchmark suite for Federated Continual Learning with foundation models."""

import os
from importlib.metadata import PackageNotFoundError, version

# OpenMP threads that busy-wait make every CPU step many times slower as soon as another process is busy
# (measured 16-50x on a 2-core machine). Passive waiting costs nothing on an idle machine. Must be set
# before torch loads its OpenMP runtime; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    __version__ = version("fcl-bench")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
