"""The one command-line layer of ``knowfree <command>`` and ``python -m jobs.<name>``.

A command is declared once, as a :class:`Command` (its options and its handler).
:func:`build_parser` makes one command a script's parser (``python -m jobs.pipeline``) or
several the sub-commands of ``knowfree``; either way with the same ``--config``, ``--set`` and
``--verbose``. :func:`exit_status` is the one error path: an error the user can fix (a
:class:`KnowFreeError` -- bad config key, malformed file -- or a missing file) is one line on
stderr and exit status 2; anything else is a bug and keeps its traceback.

No Ray here: the Ray jobs declare their commands in ``jobs/cli.py`` with these pieces.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from .errors import KnowFreeError
from .output import OutputSettings, configure_output

#: A command's body: the parsed options in, the exit status out (None: 0).
Handler = Callable[[argparse.Namespace], Optional[int]]
#: What a user can fix; every other exception is a bug and keeps its traceback. The OS errors are
#: a path the user gave (an option, a config key) that is missing or of the wrong kind: a folder
#: where a file belongs (``--data folder``, ``--output folder``) or a file where a folder does
#: (``--out file.jsonl`` for sample's output folder). Every command gets them here, in one place.
USER_ERRORS = (KnowFreeError, FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError)
#: The OS errors of USER_ERRORS in words that say what was expected instead of ``[Errno 21]``.
_PATH_PROBLEMS = (
    (FileNotFoundError, "no such file or folder"),
    (IsADirectoryError, "is a folder, but a file is expected here"),
    (NotADirectoryError, "part of this path is a file, but a folder is expected there"),
    (FileExistsError, "is a file, but a folder is expected here"),
)
#: Where the shorthand flags of :func:`add_override_flag` collect their ``KEY=VALUE`` items.
_FLAG_OVERRIDES = "flag_overrides"


@dataclass(frozen=True)
class ConfigOptions:
    """A command that reads a YAML config: ``--config FILE`` and ``--set KEY=VALUE`` (repeatable)."""

    required: bool = False
    help: str = "YAML config file (see configs/)"
    set_help: str = "override a config key, e.g. --set train.epochs=5 (repeatable)"


def _no_options(parser: argparse.ArgumentParser) -> None:
    del parser


@dataclass(frozen=True)
class Command:
    """A command: ``knowfree NAME`` or ``python -m jobs.NAME``."""

    name: str
    help: str
    handler: Handler
    #: Adds the command's own options (beyond --config, --set and --verbose).
    options: Callable[[argparse.ArgumentParser], None] = _no_options
    config: Optional[ConfigOptions] = None

    def run(self, argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
        """Parse ``argv`` and run the handler. A user error is raised, not reported: the
        callers that want the exit status go through :func:`main`."""
        return run_parsed(parse(build_parser(self, prog=prog), argv))


def add_set_option(parser: argparse.ArgumentParser, help: str = ConfigOptions.set_help) -> None:
    """The one ``--set KEY=VALUE``: repeatable, collected in ``args.overrides``."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_config_options(parser: argparse.ArgumentParser, options: ConfigOptions = ConfigOptions()) -> None:
    parser.add_argument("--config", "-c", required=options.required, help=options.help)
    add_set_option(parser, options.set_help)


class _OverrideFlag(argparse.Action):
    """A flag that stands for ``--set KEY=VALUE`` (``--workers 4`` for ``ray_train.num_workers=4``)."""

    def __init__(self, option_strings, dest, key: str, value: Optional[str] = None, **kwargs):
        self.key, self.value = key, value
        super().__init__(option_strings, _FLAG_OVERRIDES, nargs=0 if value is not None else None, default=[],
                         **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        # A new list: the default one is shared by every flag (and every parse).
        items = list(getattr(namespace, self.dest, None) or [])
        items.append(f"{self.key}={self.value if self.value is not None else values}")
        setattr(namespace, self.dest, items)


def add_override_flag(parser: argparse.ArgumentParser, flag: str, key: str, *, help: str,
                      value: Optional[str] = None, type: Callable[[str], object] = str) -> None:
    """``flag VALUE`` (or, with ``value``, the bare ``flag``) as a shorthand for ``--set key=VALUE``.
    The shorthands are applied after every ``--set``, so they win over it."""
    if value is not None:
        parser.add_argument(flag, action=_OverrideFlag, key=key, value=value, help=help)
    else:
        parser.add_argument(flag, action=_OverrideFlag, key=key, type=type, help=help,
                            metavar=key.rsplit(".", 1)[-1].upper())


def _add_verbose(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--verbose", "-v", action="store_true", default=default,
                        help="show Ray's and transformers' own logs and progress bars (or KNOWFREE_VERBOSE=1)")


def _add_command(parser: argparse.ArgumentParser, command: Command, sub_command: bool) -> None:
    # Under ``knowfree`` the flag also works after the sub-command; SUPPRESS keeps the
    # sub-parser from resetting a ``knowfree --verbose`` given before it.
    _add_verbose(parser, argparse.SUPPRESS if sub_command else False)
    if command.config is not None:
        add_config_options(parser, command.config)
    command.options(parser)
    parser.set_defaults(handler=command.handler, command=command.name)


def build_parser(commands: Union[Command, Sequence[Command]], prog: Optional[str] = None,
                 description: Optional[str] = None) -> argparse.ArgumentParser:
    """One command: its options at the top (``python -m jobs.NAME``); several: sub-commands
    (``knowfree NAME``)."""
    if isinstance(commands, Command):
        parser = argparse.ArgumentParser(prog=prog, description=description or commands.help)
        _add_command(parser, commands, sub_command=False)
        return parser
    parser = argparse.ArgumentParser(prog=prog, description=description)
    _add_verbose(parser, False)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in commands:
        _add_command(sub.add_parser(command.name, help=command.help, description=command.help), command,
                     sub_command=True)
    return parser


def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *getattr(args, _FLAG_OVERRIDES, [])]
    return args


def run_parsed(args: argparse.Namespace) -> int:
    configure_output(OutputSettings.resolve(args.verbose))
    return int(args.handler(args) or 0)


def exit_status(prog: str, run: Callable[[], Optional[int]]) -> int:
    """Run; a user error prints ``PROG: error: MESSAGE`` on stderr, on one line (OmegaConf's
    messages span several: their lines are joined with "; "), and gives status 2."""
    try:
        return int(run() or 0)
    except USER_ERRORS as error:
        message = "; ".join(line.strip() for line in _describe(error).splitlines() if line.strip())
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None:
        for kind, problem in _PATH_PROBLEMS:
            if isinstance(error, kind):
                return f"{error.filename}: {problem}"
    return str(error)


def script_prog() -> str:
    """``python -m jobs.pipeline`` or ``quality.py``: how this process was started."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    # A package run with -m (jobs.tune) has its __main__ module as the spec: name the package.
    return f"python -m {spec.name.removesuffix('.__main__')}" if spec is not None else Path(sys.argv[0]).name


def main(commands: Union[Command, Sequence[Command]], argv: Optional[Sequence[str]] = None,
         prog: Optional[str] = None, description: Optional[str] = None) -> int:
    """Parse, run, report a user error as status 2: ``knowfree`` and ``python -m jobs.NAME``."""
    parser = build_parser(commands, prog=prog or script_prog(), description=description)
    args = parse(parser, argv)
    name = parser.prog if isinstance(commands, Command) else f"{parser.prog} {args.command}"
    return exit_status(name, lambda: run_parsed(args))


def run_main(script_main: Callable[[Optional[list[str]]], int], argv: Optional[list[str]] = None) -> int:
    """A script that parses its own options (``bench/quality.py``): quiet output unless
    ``KNOWFREE_VERBOSE=1``, and the same error path."""
    configure_output(OutputSettings.from_environment())
    return exit_status(script_prog(), lambda: script_main(argv))
