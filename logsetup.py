"""Logging of the servers: where it goes (stderr or a rotating file) and how it looks.

``--log-file PATH`` writes the log to PATH instead of stderr, rotated by
size (``logging.handlers.RotatingFileHandler``: LOG_MAX_BYTES per file,
LOG_BACKUPS old files PATH.1 .. PATH.N), so a server left running for
months cannot fill its disk with its own log.  ``--log-format json`` writes
one JSON object per line (time in Unix seconds and ISO 8601, level,
logger, process label, message, and the traceback if any), for log
shippers; ``text`` (the default) is the familiar one-liner.

Only ``main()`` of a server calls ``configure``; modules just log.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys

import views

LOG_FORMATS = ("text", "json")
# 10 MiB x (1 + 5) files: a month of INFO lines of a busy master, and a
# bound on the disk a log can take.
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5


def add_log_flags(parser) -> None:
    """--log-file and --log-format (the servers' flags; --log-level is in config.add_common_flags)."""
    parser.add_argument("--log-file", metavar="PATH",
                        help=f"log to PATH instead of stderr, rotated at {LOG_MAX_BYTES // (1024 * 1024)} MiB "
                             f"({LOG_BACKUPS} old files kept)")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                        help="text (default) or json: one JSON object per line")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, time_iso, level, process, logger, message[, exception]."""

    def __init__(self, process_label: str):
        super().__init__()
        self.process_label = process_label

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": round(record.created, 3), "time_iso": views.iso_time(record.created),
                "level": record.levelname, "process": self.process_label, "logger": record.name,
                "message": record.getMessage()}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """RotatingFileHandler whose files are readable by their owner only: logs name files and peers."""

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


def configure(process_label: str, level: str, log_file: str | None = None, log_format: str = "text") -> None:
    """Send the root logger's records to stderr or a rotating ``log_file``, as text or JSON.

    ``process_label`` names the process in every line ("master", "node
    <id>").  Raises OSError if ``log_file`` cannot be opened.
    """
    if log_file:
        directory = os.path.dirname(os.path.abspath(log_file))
        os.makedirs(directory, exist_ok=True)
        handler: logging.Handler = PrivateRotatingFileHandler(
            log_file, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(process_label))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {process_label} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
