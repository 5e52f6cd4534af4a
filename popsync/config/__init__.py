"""Configuration: the YAML file, validated into frozen pydantic models.

Contract
--------
* :func:`resolve_config_path` picks the file: ``-c``, else ``$POPSYNC_CONFIG``,
  else ``$XDG_CONFIG_HOME/popsync/config.yaml``.
* :func:`load_config` reads it and returns a :class:`Config`, or raises
  :class:`~popsync.errors.ConfigError` whose message holds one line per problem,
  each naming the file, the account (by name, or ``#N`` counted from 1 when the
  name is unusable) and the key::

      /etc/popsync.yaml: account 'home': port: must be between 1 and 65535

  Every user mistake ends in that error -- never in a traceback, and never in
  pydantic's own multi-line text, which is translated into short phrases.
* A secret never reaches a message, a ``repr`` or a log line, and error texts
  never quote input values.

The package, one idea per module:

* :mod:`~popsync.config.paths` -- ``~``/``$VAR`` expansion, XDG directories,
  the config file's and the ledger's locations;
* :mod:`~popsync.config.values` -- durations, sizes, ports, names: parsers,
  rules and the annotated field types;
* :mod:`~popsync.config.models` -- :class:`Account` and :class:`Config`, and
  their invariants;
* :mod:`~popsync.config.secrets` -- the three secret sources and their rules;
* :mod:`~popsync.config.targets` -- the delivery-target keys, exactly one per
  account, and :class:`ImapTarget`;
* :mod:`~popsync.config.problems` -- pydantic's errors as one line each;
* :mod:`~popsync.config.loading` -- file checks, YAML, :func:`load_config`.

Only pydantic and PyYAML are imported at module level; ``subprocess``, ``pwd``
and ``difflib`` are imported where they are needed, to keep start-up fast.
"""

from __future__ import annotations

from popsync.config.loading import load_config
from popsync.config.models import (
    DEFAULT_INTERVAL,
    DEFAULT_MAX_LINE_LENGTH,
    DEFAULT_MIN_RATE,
    DEFAULT_POLL_TIMEOUT,
    DEFAULT_TIMEOUT,
    PASSWORD_COMMAND_TIMEOUT,
    Account,
    Config,
)
from popsync.config.paths import resolve_config_path
from popsync.config.targets import TARGET_KEYS, ImapTarget
from popsync.config.values import parse_duration, parse_size
from popsync.options import AuthMethod, TlsMode

__all__ = [
    "DEFAULT_INTERVAL",
    "DEFAULT_MAX_LINE_LENGTH",
    "DEFAULT_MIN_RATE",
    "DEFAULT_POLL_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "PASSWORD_COMMAND_TIMEOUT",
    "TARGET_KEYS",
    "Account",
    "AuthMethod",
    "Config",
    "ImapTarget",
    "TlsMode",
    "load_config",
    "parse_duration",
    "parse_size",
    "resolve_config_path",
]
