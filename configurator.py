"""Configuration for the scripts: defaults, then config files, then --key=value overrides.

A config file is a Python file of plain assignments (`batch_size = 12`), as in nanoGPT. An
override's value is read with ast.literal_eval, so `--lr=3e-4`, `--compile=False` and
`--betas=(0.9,0.95)` work; a value that is not a literal is taken as a string, so
`--device=cuda` needs no quotes. Every key must already exist in the script's defaults and keep
its type; a mistake is reported as ConfigError, naming the key and the closest valid one.
"""
import ast
import difflib
import os
import types


class ConfigError(ValueError):
    """A mistake in a config file or a command-line override, worded for the user."""


def _closest_hint(key, known):
    match = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {match[0]}?)" if match else ""


def _coerce(key, value, default):
    """Value with the type of the default, or ConfigError. int is accepted where float is."""
    if default is None or value is None:
        return value
    expected = type(default)
    if expected is float and type(value) is int:
        return float(value)
    if expected in (tuple, list) and isinstance(value, (tuple, list)):
        return expected(value)
    if type(value) is not expected:
        raise ConfigError(f"{key} expects {expected.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as cuda or out-zh is a string


def load_config_file(path, config):
    """Apply the assignments in a config file to config (in place)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8") from None
    namespace = {}
    try:
        exec(compile(source, path, "exec"), {}, namespace)
    except Exception as e:  # the user's file: report where it failed, not our stack
        raise ConfigError(f"config file {path} failed: {type(e).__name__}: {e}") from None
    for key, value in namespace.items():
        if key.startswith("_") or isinstance(value, types.ModuleType):
            continue
        if key not in config:
            raise ConfigError(f"config file {path} sets unknown key {key}{_closest_hint(key, config)}")
        config[key] = _coerce(key, value, config[key])


def parse_args(config, argv):
    """Apply config files (bare arguments) and --key=value overrides from argv to config.

    config maps every known key to its default; a new dict is returned.
    """
    config = dict(config)
    for arg in argv:
        if not arg.startswith("--"):
            load_config_file(arg, config)
            continue
        key, sep, text = arg[2:].partition("=")
        if not sep:
            raise ConfigError(f"argument {arg} needs a value: --{key}=VALUE")
        if key not in config:
            raise ConfigError(f"unknown option --{key}{_closest_hint(key, config)}")
        value = _parse_value(text)
        if isinstance(config[key], str) and not isinstance(value, str):
            value = text  # --out_dir=2024 means the folder "2024"
        config[key] = _coerce(key, value, config[key])
    return config
