"""Shared by the Hydra apps: where the configs live, and how a command reports failure.

Every ``fahr`` subcommand runs its pipeline function through :func:`run_command`, so bad input ends
as one line on stderr (``fahr predict: error: ...``, exit status 2) and fahr's own bugs as one line
naming the exception type and where it was raised (exit status 1), with the traceback only when
asked for (``fahr --debug <command> ...`` or ``FAHR_DEBUG=1``). Messages never carry data: an
unexpected exception's own message may quote a table cell, so it is shown only in debug mode.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: exit statuses of ``fahr <command>``
EXIT_INPUT_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_INTERRUPTED = 130
#: set when :func:`run_command` has reported a failure (so ``fahr.cli.main`` can tell Hydra's own
#: config errors, which exit 1 before any command runs, from a reported internal error)
REPORTED: list[str] = []


def config_dir() -> str:
    """Absolute path of the ``conf/`` directory.

    Installed (wheel or editable), ``conf/`` is the package ``fahr.conf``; from a bare checkout on
    ``PYTHONPATH`` it is ``<checkout>/conf``.
    """
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if (checkout / "pretrain.yaml").is_file():
        return str(checkout)
    from importlib.resources import files

    return str(files("fahr.conf"))


def debug_mode() -> bool:
    """True when tracebacks were asked for (``--debug`` sets ``FAHR_DEBUG=1``)."""
    return os.environ.get("FAHR_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _where_raised(err: BaseException) -> str:
    """``file:line in function`` of the innermost frame of project code (fahr, data_pipelines, or a
    caller's own code), skipping frames inside installed libraries and the standard library."""
    frames = traceback.extract_tb(err.__traceback__)
    libraries = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}

    def ours(filename: str) -> bool:
        path = os.path.realpath(filename)
        if re.search(r"[/\\]site-packages[/\\](fahr|data_pipelines)[/\\]", path):
            return True
        return "site-packages" not in path and not any(path.startswith(lib + os.sep) for lib in libraries)

    frame = ([f for f in frames if ours(f.filename)] or frames or [None])[-1]
    if frame is None:
        return "unknown location"
    path = os.path.realpath(frame.filename)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    short = os.path.relpath(path, root) if path.startswith(root + os.sep) else os.path.basename(path)
    return f"{short}:{frame.lineno} in {frame.name}"


_EXCEPTION_PREFIX = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning): ")


def _one_line(message: str) -> str:
    """The message on one line. An error raised in a DataLoader worker arrives wrapped in the
    worker's traceback text ("Caught ... in DataLoader worker process 0. Original Traceback ..."):
    its last line, without the exception's class name, is the message."""
    if "Traceback (most recent call last)" in message:
        last = [line for line in message.splitlines() if line.strip()][-1]
        message = _EXCEPTION_PREFIX.sub("", last, count=1)
    return " ".join(message.split())


#: lines of OmegaConf's error text that locate the key again, in its own words (the key is named already)
_OMEGACONF_DETAIL = re.compile(r"^\s*(full_key|object_type|reference_type|value|child_node|parent_node)\s*[:=]")


def config_error_line(err: BaseException) -> str:
    """A config Hydra cannot compose (unknown key, wrong type, bad override syntax, missing config
    group option) as one line: Hydra's message, then OmegaConf's reason without its locator lines.
    ``"Could not override 'batchsize'. Key 'batchsize' not in 'PredictConfig'. To append to your
    config use +batchsize=3"``."""
    from omegaconf.errors import OmegaConfBaseException

    lines: list[str] = []
    for raw in str(err).splitlines():
        if raw.startswith("Config search path"):  # where Hydra looked: not the user's mistake
            break
        if raw[:1].isspace() and raw.strip() and lines and lines[-1].endswith((":", ",")):
            lines[-1] += " " + raw.strip() + ","  # an option Hydra lists under its heading
        elif raw.strip():
            lines.append(raw.strip())
    lines = [line.rstrip(",") for line in lines]
    cause = err.__cause__
    if isinstance(cause, OmegaConfBaseException) and cause is not err:
        reason = [line.strip() for line in str(cause).splitlines() if line.strip() and not _OMEGACONF_DETAIL.match(line)]
        lines[1:1] = reason
    text = ". ".join(line.rstrip(".") for line in lines if not _OMEGACONF_DETAIL.match(line))
    return text or type(err).__name__


def run_command(command: str, pipeline: Callable[[Any], Any], cfg: Any) -> Any:
    """Run ``pipeline(cfg)`` for ``fahr <command>`` and turn failures into one-line reports.

    - :class:`fahr.boundary.InputError` (and an unset mandatory option): ``fahr <command>: error:
      <message>``, exit status 2;
    - Ctrl-C: ``fahr <command>: interrupted``, exit status 130;
    - anything else is a bug in fahr: ``fahr <command>: internal error: <type> at <file:line>``
      plus how to get the traceback, exit status 1; in debug mode the exception propagates (Hydra
      prints the traceback; set ``HYDRA_FULL_ERROR=1`` for the frames inside Hydra too).
    """
    from omegaconf.errors import MissingMandatoryValue

    from fahr.boundary import InputError

    try:
        return pipeline(cfg)
    except InputError as err:
        if debug_mode():
            REPORTED.append("debug")
            raise
        message = _one_line(str(err))
        print(f"fahr {command}: error: {message}", file=sys.stderr)
        REPORTED.append("input")
        sys.exit(EXIT_INPUT_ERROR)
    except MissingMandatoryValue as err:
        if debug_mode():
            REPORTED.append("debug")
            raise
        key = getattr(err, "full_key", None) or "a required option"
        print(f"fahr {command}: error: {key} is required: add {key}=... to the command line", file=sys.stderr)
        REPORTED.append("input")
        sys.exit(EXIT_INPUT_ERROR)
    except KeyboardInterrupt:
        print(f"fahr {command}: interrupted", file=sys.stderr)
        REPORTED.append("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as err:  # noqa: BLE001 - the last line of defence: no traceback, no data
        if debug_mode():
            REPORTED.append("debug")
            raise
        print(f"fahr {command}: internal error: {type(err).__name__} at {_where_raised(err)}. This is a bug in "
              f"fahr, not in your input: rerun with `fahr --debug {command} ...` for the traceback and report it",
              file=sys.stderr)
        REPORTED.append("internal")
        sys.exit(EXIT_INTERNAL_ERROR)
