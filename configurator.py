"""Configuration for the scripts: defaults, then config files, then --key=value overrides.

A config file is a Python file of plain assignments (`batch_size = 12`), as in nanoGPT. An
override's value is read with ast.literal_eval, so `--lr=3e-4`, `--compile=False` and
`--betas=(0.9,0.95)` work; a value that is not a literal is taken as a string, so
`--device=cuda` needs no quotes. Every key must already exist in the script's defaults and keep
its type (None only where the default is None, NaN never); a mistake is reported as ConfigError,
naming the key and the closest valid one. --help (or -h) prints every option with its default and
the comment beside it in the source of the script's DEFAULTS, then exits.
"""
import ast
import difflib
import io
import math
import os
import sys
import tokenize
import types

HELP_FLAGS = ("--help", "-h")


class ConfigError(ValueError):
    """A mistake in a config file or a command-line override, worded for the user."""


def _closest_hint(key, known):
    match = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {match[0]}?)" if match else ""


def _is_nan(value):
    if isinstance(value, (tuple, list)):
        return any(map(_is_nan, value))
    return isinstance(value, float) and math.isnan(value)


def _coerce(name, value, default):
    """Value with the type of the default, or ConfigError naming the option (name). int is accepted
    where float is; None only where the default is None; NaN nowhere (every check after this would
    let it through: NaN <= 0 is False)."""
    if _is_nan(value):
        raise ConfigError(f"{name} expects a number, got NaN")
    if default is None:
        return value
    expected = type(default)
    if expected is float and type(value) is int:
        return float(value)
    if expected in (tuple, list) and isinstance(value, (tuple, list)):
        return expected(value)
    if value is None:
        raise ConfigError(f"{name} expects {expected.__name__}, got None; leave it out for its default, {default!r}")
    if type(value) is not expected:
        raise ConfigError(f"{name} expects {expected.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as cuda or out-zh is a string


def load_config_file(path, config, defaults=None):
    """Apply the assignments in a config file to config (in place), each checked against the type
    of its value in defaults (config's own, if not given)."""
    defaults = config if defaults is None else defaults
    if os.path.isdir(path):
        raise ConfigError(f"config file {path} is a folder; name a .py file of assignments, e.g. config/train_zh_speedrun.py")
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
        config[key] = _coerce(f"{key} in config file {path}", value, defaults[key])


def parse_args(config, argv):
    """Apply config files (bare arguments) and --key=value overrides from argv to config.

    config maps every known key to its default; a new dict is returned. With --help or -h anywhere
    in argv, the help is printed and SystemExit(0) raised before anything is read.
    """
    if any(arg in HELP_FLAGS for arg in argv):
        print(help_text(config, _defining_module(config, sys._getframe(1))))
        raise SystemExit(0)
    defaults, config = config, dict(config)
    for arg in argv:
        if not arg.startswith("--"):
            load_config_file(arg, config, defaults)
            continue
        key, sep, text = arg[2:].partition("=")
        if not sep:
            raise ConfigError(f"argument {arg} needs a value: --{key}=VALUE")
        if key not in config:
            raise ConfigError(f"unknown option --{key}{_closest_hint(key, config)}")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a byte the locale could not decode comes as a lone surrogate
                raise ConfigError(f"--{key} is not UTF-8 text; give it in UTF-8 (or put it in a UTF-8 file)") from None
        value = _parse_value(text)
        if isinstance(defaults[key], str) and not isinstance(value, str):
            value = text  # --out_dir=2024 means the folder "2024"
        config[key] = _coerce(f"--{key}", value, defaults[key])
    return config


def _defining_module(config, frame):
    """The globals of the module whose DEFAULTS has config's keys: the first such module up the call
    stack from frame (train.main's for train_adam.py, which passes train.DEFAULTS on)."""
    while frame is not None:
        defaults = frame.f_globals.get("DEFAULTS")
        if isinstance(defaults, dict) and defaults.keys() == config.keys():
            return frame.f_globals
        frame = frame.f_back
    return None


def _comments(source):
    """{line: (comment text, whether the comment is alone on its line)} of Python source."""
    comments, code_lines = {}, set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        line = token.start[0]
        if token.type == tokenize.COMMENT:
            comments[line] = (token.string.lstrip("#").strip(), line not in code_lines)
        elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.update(range(line, token.end[0] + 1))
    return comments


def _option_notes(module_globals, name="DEFAULTS"):
    """The source of the dict assigned to name in a module, as a list of ("section", text) for a
    comment line and ("option", key, comment) for each key with the comment on its line ("" if none).
    A `dict(...)` or `{...}` is read; `a | b` is a's notes, then b's, where a key b sets again moves
    to b's place (keeping a's comment if b gives none); `other_module.DEFAULTS` is read from that module."""
    path = module_globals.get("__file__")
    if not path or not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        source = f.read()
    tree = ast.parse(source)
    value = next((node.value for node in tree.body if isinstance(node, ast.Assign)
                  and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)), None)
    return _notes_of(value, module_globals, _comments(source)) if value is not None else []


def _notes_of(node, module_globals, comments):
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        left = _notes_of(node.left, module_globals, comments)
        right = _notes_of(node.right, module_globals, comments)
        comment_of = {note[1]: note[2] for note in left if note[0] == "option"}
        set_again = {note[1] for note in right if note[0] == "option"}
        kept = [note for note in left if note[0] == "section" or note[1] not in set_again]
        return kept + [("option", note[1], note[2] or comment_of.get(note[1], "")) if note[0] == "option" else note
                       for note in right]
    if isinstance(node, ast.Name):
        return _option_notes(module_globals, node.id)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        module = module_globals.get(node.value.id)
        return _option_notes(vars(module), node.attr) if isinstance(module, types.ModuleType) else []
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        keys = [(kw.arg, kw.lineno, kw.end_lineno) for kw in node.keywords if kw.arg]
    elif isinstance(node, ast.Dict):
        keys = [(k.value, k.lineno, v.end_lineno) for k, v in zip(node.keys, node.values)
                if isinstance(k, ast.Constant) and isinstance(k.value, str)]
    else:
        return []
    last_key_ending_on = {end: key for key, _, end in keys}
    notes = []
    for line, (text, alone) in sorted(comments.items()):
        if not alone or not node.lineno < line < node.end_lineno:
            continue
        if notes and notes[-1][0] == line - 1:  # a comment of several lines is one section header
            notes[-1] = (line, "section", f"{notes[-1][2]}\n{text}")
        else:
            notes.append((line, "section", text))
    for key, start, end in keys:
        text, alone = comments.get(end, ("", True))
        notes.append((start, "option", key, text if not alone and last_key_ending_on[end] == key else ""))
    return [note[1:] for note in sorted(notes, key=lambda note: note[0])]


def _shown(value):
    """A default as it would be typed after --key=."""
    if isinstance(value, str):
        return value or "''"
    return repr(value)


def _usage_and_description():
    """The command that ran this script, and its docstring's first paragraph (with the example
    commands that follow it, where they do)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    command = f"python -m {spec.name}" if spec and spec.name != "__main__" else f"python {os.path.basename(sys.argv[0])}"
    paragraphs = (getattr(main, "__doc__", None) or "").strip("\n").split("\n\n")
    description = paragraphs[:2] if len(paragraphs) > 1 and paragraphs[1].startswith("    ") else paragraphs[:1]
    return f"usage: {command} [CONFIG_FILE ...] [--KEY=VALUE ...]", "\n\n".join(description).strip()


def help_text(config, module_globals=None):
    """The usage line, the script's description, then each option of config as --key=default with
    the comment from the source of module_globals' DEFAULTS, under the comment lines that group them."""
    usage, description = _usage_and_description()
    notes = _option_notes(module_globals) if module_globals else []
    notes = [note for note in notes if note[0] == "section" or note[1] in config]
    described = {note[1] for note in notes if note[0] == "option"}
    notes += [("option", key, "") for key in config if key not in described]
    width = min(max((len(f"--{key}={_shown(value)}") for key, value in config.items()), default=0), 36)
    lines = [usage, ""] + ([description, ""] if description else [])
    lines += ["Each option with its default. A config file is a Python file of assignments to the same names",
              "(name = value); config files and --name=value options apply in the order given, the last wins.", ""]
    section = None  # printed with the first option under it: a group whose options all moved is dropped
    for kind, *rest in notes:
        if kind == "section":
            section = rest[0]
            continue
        if section is not None:
            lines += [""] * (lines[-1] != "") + [f"  # {line}" for line in section.splitlines()]
            section = None
        key, comment = rest
        option = f"--{key}={_shown(config[key])}"
        lines.append(f"  {option:<{width}}  {comment}".rstrip())
    return "\n".join(lines)
