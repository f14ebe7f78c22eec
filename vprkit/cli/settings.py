"""Settings: flags generated from config dataclasses, and their layers.

Precedence, once for all scripts: command-line flags > VPR_<FLAG> environment variables >
the --config TOML file > defaults. Each flag is declared once, as a dataclass field with flag();
the config dataclasses live in vprkit/cli/configs.py (shared groups, torch-free scripts) and
trainable_vpr/config.py (the scripts that describe images). A flag whose name or meaning changed
keeps its old form (flag(..., deprecated=("--old",))): accepted on the command line, as a
VPR_OLD variable or a TOML key, with one deprecation line on stderr naming the new flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Callable, Sequence

from vprkit.cli import CliParser, VPRError


def flag(default: Any, help: str, group: str = "training", **extra: Any) -> Any:  # noqa: A002
    """A config dataclass field that is also a command-line flag: its help, its group (= its
    --config TOML section) and optionally choices, aliases, required, metavar, positional (an
    argument without --), deprecated (old option strings still accepted, with a warning) and
    old_sections (TOML sections the key used to sit in, accepted with a warning) and resumable
    (train_vpr.py --resume CKPT may change it: more epochs, another machine or output folder;
    any other flag would make the resumed run a different run).
    A list default makes a list flag (nargs +; nargs=N: exactly N values, e.g. --seq_velocity MIN MAX)."""
    metadata = {"help": help, "group": group, **extra}
    if isinstance(default, (list, tuple)) and not isinstance(default, str):
        items = list(default)
        return field(default_factory=lambda: list(items), metadata=metadata)
    return field(default=default, metadata=metadata)


def resumable_settings(cls: type) -> set[str]:
    """The flags of `cls` declared resumable (flag(..., resumable=True))."""
    return {f.name for f in flag_fields(cls) if f.metadata.get("resumable")}


def field_default(f: dataclasses.Field) -> Any:
    """A field's default value (a fresh list for list flags)."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def flag_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a config dataclass that are flags, in declaration order."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def deprecation_warning(old: str, new: str) -> None:
    """The one line a deprecated flag, variable or key prints (stderr)."""
    print(f"warning: {old} is deprecated; use {new}", file=sys.stderr, flush=True)


class DeprecatedFlag(argparse.Action):
    """An old option string of a flag: sets the new flag's value and warns once, in one line."""

    def __init__(self, option_strings: Sequence[str], dest: str, new_flag: str = "", **kwargs: Any) -> None:
        self.new_flag = new_flag
        self.warned = False
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if not self.warned:
            deprecation_warning(option_string or self.option_strings[0], self.new_flag)
            self.warned = True
        setattr(namespace, self.dest, True if self.nargs == 0 else values)


def _settings_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Each setting's own action by its name (deprecated forms and --help/--config/--debug left out)."""
    return {a.dest: a for a in parser._actions if a.dest not in _NOT_SETTINGS and not isinstance(a, DeprecatedFlag)}


def _deprecated_actions(parser: argparse.ArgumentParser) -> dict[str, DeprecatedFlag]:
    """Deprecated forms by their old name without dashes (e.g. output_dir)."""
    return {opt.lstrip("-"): a for a in parser._actions if isinstance(a, DeprecatedFlag) for opt in a.option_strings}


# Every config class's setting names: a --config file may hold another script's settings
# (a training key read by eval_trained.py), which are skipped rather than refused.
_REGISTERED: dict[str, type] = {}


def registered(cls: type) -> type:
    """Class decorator: make a config dataclass's settings known to every script's --config."""
    _REGISTERED[cls.__name__] = cls
    return cls


def known_settings() -> set[str]:
    """Every registered setting's name, aliases and old forms, as TOML keys."""
    names = set()
    for cls in _REGISTERED.values():
        for f in dataclasses.fields(cls):
            names |= {f.name, *(o.lstrip("-")
                                for o in (*f.metadata.get("aliases", ()), *f.metadata.get("deprecated", ())))}
    return names


def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = (),
                    optional: Sequence[str] = ()) -> None:
    """Flags for every flag field of a config dataclass (types from its type hints), grouped;
    then the deprecated old forms whose option string no flag of this parser holds."""
    hints = typing.get_type_hints(cls)
    groups = {g.title: g for g in parser._action_groups}
    fields = [f for f in flag_fields(cls) if f.name not in skip]
    for title in sorted({f.metadata["group"] for f in fields} - set(groups), key=_group_rank):
        groups[title] = parser.add_argument_group(title)  # --help lists the groups in one order everywhere
    for f in fields:
        meta = f.metadata
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        kind, nargs = _flag_type(hints[f.name])
        nargs = meta.get("nargs", nargs)
        default = field_default(f)
        extra = {k: meta[k] for k in ("metavar",) if k in meta}
        if meta.get("positional"):
            action = group.add_argument(f.name, type=kind, nargs=None if meta.get("required") else "?", default=default,
                                        help=meta["help"], **extra)
        elif kind is bool:
            kind_action = argparse.BooleanOptionalAction if default else "store_true"
            action = group.add_argument(f"--{f.name}", *meta.get("aliases", ()), action=kind_action, default=default,
                                        help=meta["help"])
        else:
            required = meta.get("required", False) and f.name not in optional
            action = group.add_argument(f"--{f.name}", *meta.get("aliases", ()), type=kind, nargs=nargs,
                                        default=default, required=required, choices=meta.get("choices"),
                                        help=meta["help"], **extra)
        action.old_sections = tuple(meta.get("old_sections", ()))
    taken = set(parser._option_string_actions)
    renamed = getattr(cls, "DEPRECATED_FLAGS", {})  # a script's own old forms: {"--old": "field"}
    for f in fields:
        old = [o for o in (*f.metadata.get("deprecated", ()), *(o for o, n in renamed.items() if n == f.name))
               if o not in taken]
        if old:
            real = parser._option_string_actions[f"--{f.name}"]
            if real.required:  # given by its old form counts too: checked after parsing (check_required)
                real.required, real.required_flag = False, True
            kind, nargs = _flag_type(hints[f.name])
            nargs = f.metadata.get("nargs", nargs)
            parser.add_argument(*old, dest=f.name, action=DeprecatedFlag, new_flag=f"--{f.name}",
                                help=argparse.SUPPRESS, default=argparse.SUPPRESS, type=None if kind is bool else kind,
                                nargs=0 if kind is bool else nargs)
            taken.update(old)


GROUP_ORDER = ("experiment", "tuning", "data", "model", "training", "routes", "evaluation", "outputs", "system")


def _group_rank(title: str) -> tuple[int, str]:
    return (GROUP_ORDER.index(title) if title in GROUP_ORDER else len(GROUP_ORDER), title)


def _flag_type(hint: Any) -> tuple[type, str | None]:
    """(scalar type, nargs) of a field's type hint: list[X] is a list flag of X."""
    options = ([a for a in typing.get_args(hint) if a is not type(None)]
               if typing.get_origin(hint) not in (list, tuple) else [hint])
    options = options or [hint]
    if typing.get_origin(options[0]) in (list, tuple):
        return _scalar_type(typing.get_args(options[0])[0]), "+"
    return _scalar_type(hint), None


def _scalar_type(hint: Any) -> type:
    """int, float, bool or str from a field's type hint (Optional[X] is X)."""
    options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return options[0] if options[0] in (int, float, bool) else str


def check_choices(config: Any) -> None:
    """A config built in code (not parsed) whose value is not among its field's choices."""
    for f in dataclasses.fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices is not None and value is not None and value not in choices:
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
    actions = _settings_actions(parser)
    deprecated = _deprecated_actions(parser)
    layers: dict[str, Any] = {}
    if known.config:
        layers.update(read_config_file(known.config, actions, _sections_of(parser), deprecated))
    layers.update(environment_settings(actions, os.environ, deprecated))
    parser.set_defaults(**layers)
    for dest in layers:
        actions[dest].required = False  # given by the file or the environment
        actions[dest].required_flag = False
    return check_required(parser, parser.parse_args(argv))


def check_required(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Required flags that also have a deprecated form: given by either."""
    missing = [a.option_strings[0] for a in _settings_actions(parser).values()
               if getattr(a, "required_flag", False) and getattr(args, a.dest, None) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    return args


def given_settings(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The settings some layer gives (a flag on the command line, a VPR_* variable, a key of the
    --config file), as opposed to those left at their defaults, even where the given value
    equals the default (what `--resume CKPT` must tell apart)."""
    actions = _settings_actions(parser)
    deprecated = _deprecated_actions(parser)
    saved = {dest: (a.default, a.required) for dest, a in actions.items()}
    try:  # parse once more with every default suppressed: only given flags end in the namespace
        for action in actions.values():
            action.default, action.required = argparse.SUPPRESS, False
        given = set(vars(parser.parse_args(argv))) & set(actions)
    finally:
        for dest, (default, required) in saved.items():
            actions[dest].default, actions[dest].required = default, required
    given |= set(environment_settings(actions, os.environ, deprecated, warn=False))
    probe = CliParser(add_help=False)
    probe.add_argument("--config", default=None)
    config_file = probe.parse_known_args(argv)[0].config
    if config_file:
        given |= set(read_config_file(config_file, actions, _sections_of(parser), deprecated, warn=False))
    return given


def _sections_of(parser: argparse.ArgumentParser) -> dict[str, str]:
    """The TOML section of each setting: the title of its flag's group."""
    return {a.dest: group.title for group in parser._action_groups for a in group._group_actions
            if a.dest not in _NOT_SETTINGS and not isinstance(a, DeprecatedFlag)}


def _setting_value(action: argparse.Action, value: Any, where: str) -> Any:
    """A file or environment value checked against its flag's type and choices."""
    boolean = action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction)
    if isinstance(value, str) and (boolean or action.type in (int, float) or _takes_list(action)):
        value = _parse_text_setting(action, value, boolean, where)
    if boolean:
        ok = isinstance(value, bool)
        expected = "true or false"
    elif _takes_list(action):
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


def _takes_list(action: argparse.Action) -> bool:
    """A list flag: nargs + or *, or a fixed count of values (nargs=N, N >= 1)."""
    return action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs >= 1)


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
        if _takes_list(action):
            return [kind(v) for v in text.replace(",", " ").split()]
        return kind(text)
    except ValueError:
        raise VPRError(f"{where} = {text!r}: expected {'an integer' if kind is int else 'a number'}") from None


def environment_settings(actions: dict[str, argparse.Action], environ: dict[str, str],
                         deprecated: dict[str, DeprecatedFlag] | None = None, warn: bool = True) -> dict[str, Any]:
    """VPR_<DEST> variables (e.g. VPR_EPOCHS=3) for this parser's settings; VPR_<OLD> of a
    deprecated form too (with a warning) where the new name is not set."""
    values = {}
    for old, action in (deprecated or {}).items():
        name = ENV_PREFIX + old.upper()
        if name in environ and ENV_PREFIX + action.dest.upper() not in environ:
            if warn:
                deprecation_warning(name, ENV_PREFIX + action.dest.upper())
            values[action.dest] = _setting_value(actions[action.dest], environ[name], name)
    for dest, action in actions.items():
        name = ENV_PREFIX + dest.upper()
        if name in environ:
            values[dest] = _setting_value(action, environ[name], name)
    return values


def read_config_file(path: str | Path, actions: dict[str, argparse.Action],
                     sections: dict[str, str] | None = None, deprecated: dict[str, DeprecatedFlag] | None = None,
                     warn: bool = True) -> dict[str, Any]:
    """Settings of a TOML file: [section] key = value, keys named like the flags (aliases too),
    each in the section of its flag's group. Keys that are settings of another script (a training
    key read by eval_trained.py) are skipped; unknown sections and keys are errors. A deprecated
    key, or a key in its old section, is read with one warning line."""
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
    deprecated = deprecated or {}
    sections = sections or {}
    old_sections = {s for a in actions.values() for s in getattr(a, "old_sections", ())}
    valid_sections = sorted({s for s in sections.values() if " " not in s} | old_sections
                            | {"data", "model", "training", "system"})
    known_elsewhere = known_settings()
    values: dict[str, Any] = {}
    for section, table in document.items():
        if section in CONFIG_IGNORED_SECTIONS:
            continue
        name = SECTION_ALIASES.get(section, section)
        if name not in valid_sections or not isinstance(table, dict):
            raise VPRError(f"--config {path}: unknown section [{section}]; "
                           f"use {', '.join(f'[{s}]' for s in valid_sections)}")
        for key, value in table.items():
            where = f"{path} [{section}] {key}"
            if key in aliases:
                dest = aliases[key]
                home = sections.get(dest)
                if home and home != name and name in getattr(actions[dest], "old_sections", ()):
                    if warn:
                        deprecation_warning(f"{path} [{section}] {key}", f"[{home}] {key}")
                elif home and home != name:
                    raise VPRError(f"{where}: {key} is a [{home}] setting; move it to section [{home}]")
                values[dest] = _setting_value(actions[dest], value, where)
            elif key in deprecated and sections.get(deprecated[key].dest) == name:
                dest = deprecated[key].dest
                if warn:
                    deprecation_warning(f"{path} [{section}] {key}", f"[{name}] {dest}")
                values.setdefault(dest, _setting_value(actions[dest], value, where))
            elif key not in known_elsewhere:
                close = difflib.get_close_matches(key, list(aliases) + list(known_elsewhere), n=1)
                raise VPRError(f"{where}: unknown setting{f' (did you mean {close[0]}?)' if close else ''}; see --help")
    return values


def config_from_args(args: argparse.Namespace, cls: type, **overrides: Any) -> Any:
    """A config dataclass from parsed flags (fields the parser lacks keep their defaults)."""
    values = {f.name: getattr(args, f.name, field_default(f)) for f in dataclasses.fields(cls) if f.init}
    values.update(overrides)
    return cls(**values)


def config_parser(cls: type, description: str, skip: Sequence[str] = (), optional: Sequence[str] = (),
                  config_file: bool = True, formatter: type = argparse.ArgumentDefaultsHelpFormatter) -> CliParser:
    """The parser of a script: the flags of its config dataclass, --config (unless config_file
    is False) and --debug."""
    from vprkit.cli import add_debug_flag

    parser = CliParser(description=description, formatter_class=formatter)
    if config_file:
        add_config_file_flag(parser)
    add_config_args(parser, cls, skip=skip, optional=optional)
    add_debug_flag(parser)
    return parser


def parse_config(parser: argparse.ArgumentParser, cls: type, argv: Sequence[str] | None, layered: bool = True,
                 then: Callable[[argparse.Namespace, Any], Any] | None = None, **overrides: Any) -> Any:
    """The one way every script parses: the script's config from argv (every layer of settings
    when layered), completed by `then(args, config)` when given (train_vpr's --resume, run_experiment's
    --demo), checked by its validate() method: one VPRError line for a bad value or combination."""
    args = parse_layered(parser, argv) if layered else check_required(parser, parser.parse_args(argv))
    config = config_from_args(args, cls, **overrides)
    if then is not None:
        config = then(args, config)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config
