"""funcmesh: run Python functions on the endpoints of a funcmesh federation.

``Client`` speaks to a node's local HTTP API; ``Executor`` is a ``concurrent.futures.Executor``
on top of it.
"""

from .client import Client, FuncmeshError, RemoteError
from .executor import Executor

__all__ = ["Client", "Executor", "FuncmeshError", "RemoteError"]
__version__ = "0.1.0"
