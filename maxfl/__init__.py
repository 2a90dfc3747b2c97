"""maxfl: federated learning across manufacturing supply chains."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("maxfl")
except PackageNotFoundError:  # running from a FAB or a source tree that was not installed
    __version__ = "0.0.0+unknown"
