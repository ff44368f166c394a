"""Secrets kept out of what a run writes: its logged config, run_info.json and .hydra/ files.

A secret is the value of an environment variable or config key whose name says so (a part
ending in `key`, `token`, `secret` or `password`: `WANDB_API_KEY`, `extra.hf_token`,
`settings.api_key`; `tokenizer` and `max_new_tokens` are not), a password in a URL
(`https://user:PASSWORD@host`) or a credential in a URL's query (`?token=...`). Values under
secret names are replaced by `<redacted>`, and wherever else such a value appears inside a
text (an override `+extra.hf_token=...`, Hydra's `override_dirname`) it is replaced too.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

REDACTED = "<redacted>"
SECRET_ENDINGS = ("key", "token", "secret", "password", "passwd")
# shorter values would be replaced inside unrelated text; their keys are still redacted
MIN_SECRET_LENGTH = 6
URL_PASSWORD = re.compile(r"(://[^/\s:@]+:)[^/\s@]+@")
URL_QUERY_SECRET = re.compile(
    r"([?&][\w.-]*(?:key|token|secret|password|passwd|sig|signature)=)[^&\s#'\"]+", re.I)
OVERRIDE = re.compile(r"^([~+]{0,2}[\w.\-/]+)=(.*)$", re.S)


def is_secret_name(name: Any) -> bool:
    """Whether a key or variable name says its value is secret."""
    parts = re.split(r"[^a-z0-9]+", str(name).lower())
    return any(part.endswith(SECRET_ENDINGS) for part in parts if part)


def secret_values(*trees: Any, environ: dict[str, str] | None = None) -> set[str]:
    """The values of secret-named environment variables and of secret-named keys anywhere
    in `trees` (dicts, lists, override strings `key=value`)."""
    environ = os.environ if environ is None else environ
    found = {value for name, value in environ.items() if is_secret_name(name)}
    for tree in trees:
        found |= set(_secret_leaves(tree))
    return {value for value in found if len(value) >= MIN_SECRET_LENGTH}


def _secret_leaves(node: Any):
    if isinstance(node, dict):
        for key, value in node.items():
            if is_secret_name(key) and not isinstance(value, (dict, list)) and value is not None:
                yield str(value)
            else:
                yield from _secret_leaves(value)
    elif isinstance(node, (list, tuple)):
        for item in node:
            yield from _secret_leaves(item)
    elif isinstance(node, str):
        match = OVERRIDE.match(node)
        if match and is_secret_name(match.group(1).rsplit(".", 1)[-1]):
            yield match.group(2)


def redact(node: Any, secrets: set[str]) -> Any:
    """`node` (dicts, lists and scalars) with every secret replaced by `<redacted>`."""
    if isinstance(node, dict):
        return {key: REDACTED if is_secret_name(key) and value is not None
                and not isinstance(value, (dict, list)) else redact(value, secrets)
                for key, value in node.items()}
    if isinstance(node, (list, tuple)):
        return [redact(item, secrets) for item in node]
    if isinstance(node, str):
        return redact_text(node, secrets)
    return node


def redact_text(text: str, secrets: set[str]) -> str:
    """`text` with known secret values, URL passwords and query credentials replaced, and
    the value of an override `key=value` whose key is secret-named."""
    match = OVERRIDE.match(text)
    if match and is_secret_name(match.group(1).rsplit(".", 1)[-1]):
        return f"{match.group(1)}={REDACTED}"
    for secret in sorted(secrets, key=len, reverse=True):  # a longer one may hold a shorter
        text = text.replace(secret, REDACTED)
    text = URL_PASSWORD.sub(rf"\1{REDACTED}@", text)
    return URL_QUERY_SECRET.sub(rf"\1{REDACTED}", text)


def redact_yaml_files(paths: list[Path], secrets: set[str]) -> None:
    """Rewrites each YAML file of `paths` (Hydra's config.yaml, overrides.yaml, hydra.yaml,
    multirun.yaml) with its secrets redacted; a file without any is left as it is."""
    for path in paths:
        if not path.is_file():
            continue
        content = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        cleaned = redact(content, secrets)
        if cleaned != content:
            OmegaConf.save(OmegaConf.create(cleaned), path)


def redacted(cfg: DictConfig) -> DictConfig:
    """The resolved `cfg` with its secrets redacted (for files that keep a run's config)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    return OmegaConf.create(redact(config, secret_values(config)))


@contextlib.contextmanager
def redacted_argv():
    """`sys.argv` with its secrets redacted, for the time of the block: W&B records the
    command line of a run."""
    argv = sys.argv
    sys.argv = redact(argv, secret_values(argv))
    try:
        yield
    finally:
        sys.argv = argv
