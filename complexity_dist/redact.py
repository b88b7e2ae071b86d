"""Keeping credentials out of everything the stack writes or prints.

A tracking URI may carry a password (`http://user:pass@host:5000`) or a token in its query string, and
MLflow reads `MLFLOW_TRACKING_PASSWORD` / `MLFLOW_TRACKING_TOKEN` from the environment. The live values are
used to talk to the server; every copy that leaves the process (logs, warnings, checkpoint configs, MLflow
params and artifacts) goes through `redact` first, which puts `***` in their place.
"""
from __future__ import annotations

import os
import re
import urllib.parse
from typing import Any

MASK = "***"
# environment variables whose values are secrets wherever they show up
SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_CLIENT_CERT_PATH")
_SECRET_QUERY_KEYS = re.compile(r"(pass|secret|token|key|auth|signature|credential)", re.IGNORECASE)
_URI_WITH_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]*)@")


def redact_uri(uri: str) -> str:
    """The URI with the password of its user-info and secret-looking query values replaced by ***."""
    if not uri or "://" not in uri:
        return uri
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return _URI_WITH_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", uri)
    netloc = parts.netloc
    if "@" not in netloc and not (parts.query and _SECRET_QUERY_KEYS.search(parts.query)):
        return uri  # nothing secret: leave it byte-for-byte (urlunsplit would drop sqlite:/// slashes)
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{MASK}@{host}" if ":" in userinfo else f"{MASK}@{host}"
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = urllib.parse.urlencode([(k, MASK if _SECRET_QUERY_KEYS.search(k) else v) for k, v in pairs],
                                       safe="*")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact(text: str) -> str:
    """Any text: every URI in it redacted, and the values of the secret environment variables masked."""
    if not isinstance(text, str) or not text:
        return text
    out = re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+", lambda m: redact_uri(m.group(0)), text)
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            out = out.replace(value, MASK)
    return out


def redact_tree(value: Any) -> Any:
    """A copy of a nested dict/list structure (a config dict) with every string redacted."""
    if isinstance(value, dict):
        return {k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_tree(v) for v in value)
    if isinstance(value, str):
        return redact(value)
    return value
