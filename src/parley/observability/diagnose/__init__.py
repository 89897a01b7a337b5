"""Failure patterns from logs: WARNING+ lines (parley's JSON or console lines, any plain text) clustered into templates.

Serves `parley diagnose LOGFILE... | -` (`main`) and, through `RecentErrors`, the running process's recent errors.
"""

from parley.observability.diagnose.cli import main, parse_since
from parley.observability.diagnose.clustering import Diagnosis, FailurePattern, diagnose
from parley.observability.diagnose.events import LogEvent, event_from_dict, parse_lines
from parley.observability.diagnose.masking import mask
from parley.observability.diagnose.recent import RecentErrors
from parley.observability.diagnose.render import render_markdown

__all__ = [
    "Diagnosis", "FailurePattern", "LogEvent", "RecentErrors", "diagnose", "event_from_dict", "main",
    "mask", "parse_lines", "parse_since", "render_markdown",
]
