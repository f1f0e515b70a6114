"""Config dataclasses as command-line flags: each field's help is written once, as its --help text.

    from teachdiag.flags import opt, parse_config
    @dataclass
    class MyConfig:
        out: str = opt("output folder", "runs/x")
    cfg = parse_config(MyConfig, ["--out", "o"], prog="teachdiag mine")

`foo_bar` becomes `--foo-bar`; bools are flags; a field with positional=True is an argument.
No torch here, so the analysis commands parse the same way on a laptop.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing


def opt(help: str, default=None, **meta):
    """A config field: its default and its help (the flag's --help text). meta: choices,
    positional, nargs, show_default (False where the help already says it)."""
    kw = {"default_factory": list} if default is None and meta.get("nargs") else {"default": default}
    return dataclasses.field(metadata={"help": help, **meta}, **kw)


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argument per field: `foo_bar` -> --foo-bar; bools are flags; help from the field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta, kind = dict(f.metadata), hints[f.name]
        kw = {"help": meta.get("help", "")}
        if "choices" in meta:
            kw["choices"] = meta["choices"]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if meta.get("positional"):
            parser.add_argument(f.name, nargs=meta.get("nargs"), **kw)
            continue
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action="store_true", **kw)
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, nargs="+", type=typing.get_args(kind)[0], default=default, **kw)
        else:
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            if meta.get("show_default", True) and default not in ("", None):
                kw["help"] += f" [default: {default}]"
            parser.add_argument(flag, type=base, default=default, **kw)


_NEGATIVE = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def join_negative_values(argv: list[str]) -> list[str]:
    """`--lr -1e-3` -> `--lr=-1e-3`: argparse would take -1e-3 for a flag and say 'expected one
    argument'; joined, the value reaches the config's own check ('must be positive')."""
    out: list[str] = []
    for a in argv:
        if out and _NEGATIVE.fullmatch(a) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out


def parse_config(cls: type, argv: list[str] | None, prog: str, description: str = ""):
    """A config of type `cls` from command-line flags (for commands run as python -m ...)."""
    parser = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").split("\n")[0])
    add_dataclass_args(parser, cls)
    argv = list(argv) if argv is not None else sys.argv[1:]
    return cls(**vars(parser.parse_args(join_negative_values(argv))))
