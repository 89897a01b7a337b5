"""parley: a self-hostable backend for multi-user, real-time chat with AI agents."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("parley")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+source"
