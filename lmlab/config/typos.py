"""The closest existing key or option, for a command line Hydra refused at compose time.

Hydra names a key it cannot override (`Could not override 'model.net.hiden_size'`) or an
option it cannot find (`Could not find 'model/lstmm'`), and suggests adding the key with
`+`, which is wrong for a typo. `suggestion` composes the command line again without the
refused argument and names the existing key or option closest to it.
"""

from __future__ import annotations

import re

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from lmlab.config.cli import closest
from lmlab.config.schema import CONF_DIR, register_schema

KEY = re.compile(r"Could not override '([\w.]+)'")
OPTION = re.compile(r"Could not find '([\w/]+)/(\w+)'")


def suggestion(argv: list[str]) -> str | None:
    """`did you mean KEY=...?` for the first argument of `argv` (a command line of
    `python -m lmlab.run`) that does not compose, or None if all compose or none is close."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    register_schema()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        refused = _refused(overrides)
        if refused is None:
            return None
        message, arg = refused
        rest = [a for a in overrides if a != arg]
        key = KEY.search(message)
        if key:
            return _closest_key(key.group(1), rest, arg)
        option = OPTION.search(message)
        if option:
            group, name = option.groups()
            found = closest(name, GlobalHydra.instance().config_loader().get_group_options(group))
            return " ".join(filter(None, [found and f"did you mean {group}={found}?",
                                          _own_option(group, name, argv)]))
    return None


def _own_option(group: str, name: str, argv: list[str]) -> str:
    """Where an option of one's own is looked for (docs/extending.md)."""
    folder = next((a.partition("=")[2] for a in argv if a.startswith("user_dir=")), None)
    if folder is None:
        return (f"An option of your own is found with user_dir=FOLDER, the folder that holds "
                f"conf/{group}/{name}.yaml (docs/extending.md).")
    return f"There is no {folder}/conf/{group}/{name}.yaml."


def _refused(overrides: list[str]) -> tuple[str, str] | None:
    """(Hydra's message, the argument it names) for a command line that does not compose."""
    try:
        compose("config", overrides=overrides)
    except Exception as err:  # Hydra's composition and override errors
        message = str(err)
        named = KEY.search(message) or OPTION.search(message)
        if named is None:
            return None
        key = named.group(1)
        arg = next((a for a in overrides if a.partition("=")[0].lstrip("+~") == key), None)
        return (message, arg) if arg else None
    return None


def _closest_key(key: str, rest: list[str], arg: str) -> str | None:
    try:
        cfg = compose("config", overrides=rest)
    except Exception:  # other arguments are wrong too: Hydra names them next time
        return None
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig):
        return None
    found = closest(leaf, [str(k) for k in parent])
    if found is None:
        return None
    value = arg.partition("=")[2]
    return (f"did you mean {parent_key + '.' if parent_key else ''}{found}={value}? (Hydra's "
            f"`+{key}` would add a key that nothing reads.)")
