"""mmfl: multi-model federated learning with joint client sampling and model allocation."""

from mmfl.errors import ConfigError, DataError, MmflError
from mmfl.registry import Option, register

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "MmflError", "Option", "register", "__version__"]
