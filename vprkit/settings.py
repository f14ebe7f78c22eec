"""Settings: flags generated from config dataclasses, and their layers.

Precedence, once for all scripts: command-line flags > VPR_<FLAG> environment variables >
the --config TOML file > defaults. Each flag is declared once, as a dataclass field with _flag().
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Sequence

from vprkit.cli import CliParser, VPRError


def flag(default: Any, help: str, group: str = "training", **extra: Any) -> Any:  # noqa: A002
    """A config dataclass field that is also a command-line flag: its help, its group (= its
    --config TOML section) and optionally choices, aliases and required."""
    return field(default=default, metadata={"help": help, "group": group, **extra})


# Every config class's setting names: a --config file may hold another script's settings
# (a training key read by eval_trained.py), which are skipped rather than refused.
_REGISTERED: dict[str, type] = {}


def registered(cls: type) -> type:
    """Class decorator: make a config dataclass's settings known to every script's --config."""
    _REGISTERED[cls.__name__] = cls
    return cls


def known_settings() -> set[str]:
    return {f.name for cls in _REGISTERED.values() for f in dataclasses.fields(cls)}


def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = (),
                    optional: Sequence[str] = ()) -> None:
    """Flags for every flag field of a config dataclass (types from its type hints), grouped."""
    hints = typing.get_type_hints(cls)
    groups = {g.title: g for g in parser._action_groups}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in skip or "help" not in meta:
            continue
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        flags = [f"--{f.name}", *meta.get("aliases", ())]
        kind = _scalar_type(hints[f.name])
        if kind is bool:
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            group.add_argument(*flags, action=action, default=f.default, help=meta["help"])
            continue
        required = meta.get("required", False) and f.name not in optional
        group.add_argument(*flags, type=kind, default=f.default, required=required, choices=meta.get("choices"),
                           help=meta["help"])


def _scalar_type(hint: Any) -> type:
    """int, float, bool or str from a field's type hint (Optional[X] is X)."""
    options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return options[0] if options[0] in (int, float, bool) else str


def check_choices(config: Any) -> None:
    """A config built in code (not parsed) whose value is not among its field's choices."""
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        if choices is not None and getattr(config, f.name) not in choices:
            raise VPRError(f"--{f.name} {getattr(config, f.name)}: choose one of {', '.join(map(str, choices))}")


def add_config_file_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="TOML", default=None,
                        help="settings file: keys named like the flags, each in the section of its flag group "
                             f"([data], [model], [training], [system]...); precedence: flags > {ENV_PREFIX}* "
                             "environment variables > this file > defaults")


ENV_PREFIX = "VPR_"
SECTION_ALIASES = {"paths": "data", "logging": "system"}  # older names of two sections
CONFIG_IGNORED_SECTIONS = ("tune",)  # read by tune_vpr.py
_NOT_SETTINGS = ("help", "config", "debug")


def parse_layered(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse argv with every layer of settings, once for all scripts:
    flags > VPR_<FLAG> environment variables > the --config TOML file > defaults.
    A bad file, key or value stops with one VPRError line naming it."""
    probe = CliParser(add_help=False)
    probe.add_argument("--config", default=None)
    known = probe.parse_known_args(argv)[0]
    actions = {a.dest: a for a in parser._actions if a.dest not in _NOT_SETTINGS}
    layers: dict[str, Any] = {}
    if known.config:
        layers.update(read_config_file(known.config, actions, _sections_of(parser)))
    layers.update(environment_settings(actions, os.environ))
    parser.set_defaults(**layers)
    for dest in layers:
        actions[dest].required = False  # given by the file or the environment
    return parser.parse_args(argv)


def given_settings(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The settings some layer gives (a flag on the command line, a VPR_* variable, a key of the
    --config file), as opposed to those left at their defaults, even where the given value
    equals the default (what `--resume CKPT` must tell apart)."""
    actions = {a.dest: a for a in parser._actions if a.dest not in _NOT_SETTINGS}
    saved = {dest: (a.default, a.required) for dest, a in actions.items()}
    try:  # parse once more with every default suppressed: only given flags end in the namespace
        for action in actions.values():
            action.default, action.required = argparse.SUPPRESS, False
        given = set(vars(parser.parse_args(argv))) & set(actions)
    finally:
        for dest, (default, required) in saved.items():
            actions[dest].default, actions[dest].required = default, required
    given |= set(environment_settings(actions, os.environ))
    probe = CliParser(add_help=False)
    probe.add_argument("--config", default=None)
    config_file = probe.parse_known_args(argv)[0].config
    if config_file:
        given |= set(read_config_file(config_file, actions, _sections_of(parser)))
    return given


def _sections_of(parser: argparse.ArgumentParser) -> dict[str, str]:
    """The TOML section of each setting: the title of its flag's group."""
    return {a.dest: group.title for group in parser._action_groups for a in group._group_actions
            if a.dest not in _NOT_SETTINGS}


def _setting_value(action: argparse.Action, value: Any, where: str) -> Any:
    """A file or environment value checked against its flag's type and choices."""
    boolean = action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction)
    if isinstance(value, str) and (boolean or action.type in (int, float) or action.nargs in ("+", "*")):
        value = _parse_text_setting(action, value, boolean, where)
    if boolean:
        ok = isinstance(value, bool)
        expected = "true or false"
    elif action.nargs in ("+", "*"):
        ok = isinstance(value, list) and all(_scalar_ok(action.type, v) for v in value)
        expected = f"a list of {getattr(action.type, '__name__', 'str')}"
    else:
        ok = _scalar_ok(action.type, value)
        expected = {int: "an integer", float: "a number"}.get(action.type, "a string")
    if not ok:
        raise VPRError(f"{where} = {value!r}: expected {expected}")
    if action.type is float and not boolean:
        value = [float(v) for v in value] if isinstance(value, list) else float(value)
    if action.choices is not None and not boolean and value not in action.choices:
        raise VPRError(f"{where} = {value!r}: choose one of {', '.join(map(str, action.choices))}")
    return value


def _scalar_ok(kind: Any, value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if kind is int:
        return isinstance(value, int)
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, str)


def _parse_text_setting(action: argparse.Action, text: str, boolean: bool, where: str) -> Any:
    if boolean:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        return text
    kind = action.type or str
    try:
        if action.nargs in ("+", "*"):
            return [kind(v) for v in text.replace(",", " ").split()]
        return kind(text)
    except ValueError:
        raise VPRError(f"{where} = {text!r}: expected {'an integer' if kind is int else 'a number'}") from None


def environment_settings(actions: dict[str, argparse.Action], environ: dict[str, str]) -> dict[str, Any]:
    """VPR_<DEST> variables (e.g. VPR_EPOCHS=3) for this parser's settings."""
    values = {}
    for dest, action in actions.items():
        name = ENV_PREFIX + dest.upper()
        if name in environ:
            values[dest] = _setting_value(action, environ[name], name)
    return values


def read_config_file(path: str | Path, actions: dict[str, argparse.Action],
                     sections: dict[str, str] | None = None) -> dict[str, Any]:
    """Settings of a TOML file: [section] key = value, keys named like the flags (aliases too),
    each in the section of its flag's group. Keys that are settings of another script (a training
    key read by eval_trained.py) are skipped; unknown sections and keys are errors."""
    import difflib
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise VPRError(f"--config {path}: file not found")
    try:
        document = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise VPRError(f"--config {path}: not valid TOML ({exc})") from None
    aliases = {opt.lstrip("-"): dest for dest, a in actions.items() for opt in a.option_strings}
    sections = sections or {}
    valid_sections = sorted({s for s in sections.values() if " " not in s} | {"data", "model", "training", "system"})
    known_elsewhere = known_settings()
    values: dict[str, Any] = {}
    for section, table in document.items():
        if section in CONFIG_IGNORED_SECTIONS:
            continue
        name = SECTION_ALIASES.get(section, section)
        if name not in valid_sections or not isinstance(table, dict):
            raise VPRError(f"--config {path}: unknown section [{section}]; use {', '.join(f'[{s}]' for s in valid_sections)}")
        for key, value in table.items():
            where = f"{path} [{section}] {key}"
            if key in aliases:
                dest = aliases[key]
                home = sections.get(dest)
                if home and home != name:
                    raise VPRError(f"{where}: {key} is a [{home}] setting; move it to section [{home}]")
                values[dest] = _setting_value(actions[dest], value, where)
            elif key not in known_elsewhere:
                close = difflib.get_close_matches(key, list(aliases) + list(known_elsewhere), n=1)
                raise VPRError(f"{where}: unknown setting{f' (did you mean {close[0]}?)' if close else ''}; see --help")
    return values


def config_from_args(args: argparse.Namespace, cls: type, **overrides: Any) -> Any:
    """A config dataclass from parsed flags (fields the parser lacks keep their defaults)."""
    values = {f.name: getattr(args, f.name, f.default) for f in dataclasses.fields(cls)}
    values.update(overrides)
    return cls(**values)
