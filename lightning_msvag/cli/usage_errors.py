"""Parser errors in one line: the unknown option or key, with the closest valid choices."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import List, Optional, Sequence

from pytorch_lightning.cli import LightningArgumentParser

from .reporting import _innermost_message
from .namespace import _init_parameters
from .config_files import _key_in_files
from .configs_command import _configs_root


def _close(value: str, choices: Sequence[str], n: int = 3) -> List[str]:
    return difflib.get_close_matches(value, list(choices), n=n, cutoff=0.5)


def _options_of(parser: Optional[LightningArgumentParser]) -> List[str]:
    """The option strings ``--help`` shows (the parser's public help text)."""
    if parser is None:
        return []
    return sorted(set(re.findall(r"(--[A-Za-z_][\w.\-]*)", parser.format_help())))


def usage_error_message(text: str, parser: Optional[LightningArgumentParser], subcommand: Optional[str],
                        files: Sequence[Path] = ()) -> str:
    """jsonargparse's multi-line parser error as one line naming the bad value and the valid
    choices, the closest first (and, for a key of a config file, the file)."""
    help_hint = f"'lightning-msvag {subcommand} --help'" if subcommand else "'lightning-msvag --help'"
    m = re.search(r"does not accept option '([\w.]+)'", text)
    if m:
        key = m.group(1)
        options = _options_of(parser)
        group = "--" + key.rsplit(".", 1)[0] + "." if "." in key else "--"
        close = [c[2:] for c in _close("--" + key, [o for o in options if o.startswith(group)] or options)]
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        source = _key_in_files(key, files)
        where = f"config {source}: " if source is not None else ""
        return f"{where}unknown key {key}; {hint}{help_hint} lists the options"
    m = re.match(r"unrecognized arguments: (\S+)", text)
    if m:
        option = m.group(1).split("=", 1)[0]
        options = _options_of(parser)
        group = option.rsplit(".", 1)[0] + "." if "." in option else "--"
        close = _close(option, [o for o in options if o.startswith(group)] or options)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        return f"unknown option {option}; {hint}{help_hint} lists the options"
    m = re.search(r'Parser key "config":\s*File does not exist: \'?([^\']+)\'?', text)
    if m:
        given = Path(m.group(1))
        root = _configs_root()
        shipped = sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml"))
        close = difflib.get_close_matches(given.name, shipped, n=3, cutoff=0.7)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        return f"config file {given} does not exist; {hint}shipped configs: {', '.join(shipped)} (in {root})"
    m = re.search(r'Parser key "(\w+)".*?Problem with given class_path \'([^\']+)\':\s*(.*)', text, re.S)
    if m:
        group, class_path, reason = m.groups()
        reason = reason.split("\n    - Expected a <class 'NoneType'>")[0]
        key = re.search(r'Parser key "([\w.]+)":\s*(.*)', reason, re.S)
        if key:
            detail = " ".join(key.group(2).split())
            number = re.search(r"Expected a <class '(float|int)'>\. Got value: ([-+]?(?:nan|inf|infinity))\b", detail, re.I)
            if number:  # jsonargparse refuses the non-finite float; say why it could not be taken either
                return f"--{group}.{key.group(1)}: must be a finite number, got {number.group(2)} ({class_path})"
            detail = re.sub(r"Expected a <class '(\w+)'>\. Got value: (.*)", r"expected \1, got '\2'", detail)
            return f"--{group}.{key.group(1)}: {detail} ({class_path})"
        bad = re.search(r"Option '([\w.]+)' is not accepted", reason)
        if bad:
            params = _init_parameters(class_path)
            close = _close(bad.group(1), params)
            hint = f"did you mean --{group}.{close[0]}? " if close else ""
            return (f"--{group}.{bad.group(1)}: {class_path} has no option {bad.group(1)!r}; {hint}"
                    f"its options: {', '.join(close + [p for p in params if p not in close])}")
        return f"--{group}: {' '.join(reason.split())}"
    m = re.search(r'Parser key "(\w+)".*Expected a dot import path string: (\S+)', text, re.S)
    if m:
        return f"--{m.group(1)}: no class {m.group(2)!r} (a class name or import path); {help_hint}"
    return _innermost_message(ValueError(text))
