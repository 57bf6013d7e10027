"""Parse one menu line into a Command, or a one-line error; never raises, never runs anything.

Words are split on whitespace only: quotes and shell metacharacters are plain
characters here, so nothing a technician types is ever interpreted by a shell
on the relay. Everything after `connect DEVICE` is kept verbatim as the remote
command to run on the device.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

MAX_LINE = 4096
MAX_NAME = 253
MAX_PAGE = 100_000
COMMANDS = ("list", "connect", "show", "repair", "close", "help", "whoami", "exit")
ALIASES = {
    "c": "connect",
    "sd": "connect",
    "ls": "list",
    "quit": "exit",
    "logout": "exit",
    "?": "help",
}
USAGE = {
    "list": "list [PATTERN] [--page N]",
    "connect": "connect DEVICE [COMMAND...]   (also: c, sd)",
    "show": "show DEVICE",
    "repair": "repair DEVICE",
    "close": "close DEVICE|SESSION-ID",
    "help": "help",
    "whoami": "whoami",
    "exit": "exit",
}


@dataclass(frozen=True)
class Command:
    """A parsed menu line; name is "" for a blank line."""

    name: str
    target: str = ""
    pattern: str = ""
    page: int = 1
    remote_command: str = ""


@dataclass(frozen=True)
class ParseError:
    """Why a line is not a command, one line, safe to print."""

    message: str


def parse(line: str) -> Command | ParseError:
    """Turn a menu line into a Command or a ParseError."""
    if len(line) > MAX_LINE:
        return ParseError(f"Line too long (at most {MAX_LINE} characters).")
    if any(_is_control(ch) for ch in line):
        return ParseError("The line contains control characters; type plain text.")
    words = line.split()
    if not words:
        return Command("")
    word = words[0].lower()
    name = ALIASES.get(word, word)
    if name not in COMMANDS:
        return ParseError(f"Unknown command {_quote(words[0])}. Type 'help' for the commands.")
    args = words[1:]
    if name == "list":
        return _parse_list(args)
    if name == "connect":
        return _parse_connect(line, args)
    if name in ("show", "repair", "close"):
        return _parse_target(name, args)
    if args:
        return ParseError(f"'{name}' takes no arguments. Usage: {USAGE[name]}")
    return Command(name)


def _parse_list(args: list[str]) -> Command | ParseError:
    pattern = ""
    page = 1
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--page" or arg.startswith("--page="):
            if arg == "--page":
                if i + 1 >= len(args):
                    return ParseError(f"--page needs a number. Usage: {USAGE['list']}")
                value = args[i + 1]
                i += 1
            else:
                value = arg.split("=", 1)[1]
            number = _page_number(value)
            if number is None:
                return ParseError(f"--page must be a number from 1 to {MAX_PAGE}.")
            page = number
        elif arg.startswith("--"):
            return ParseError(f"Unknown option {_quote(arg)}. Usage: {USAGE['list']}")
        elif pattern:
            return ParseError(f"list takes one pattern. Usage: {USAGE['list']}")
        elif len(arg) > MAX_NAME:
            return ParseError(f"The pattern is longer than {MAX_NAME} characters.")
        else:
            pattern = arg
        i += 1
    return Command("list", pattern=pattern, page=page)


def _parse_connect(line: str, args: list[str]) -> Command | ParseError:
    if not args:
        return ParseError(f"Which device? Usage: {USAGE['connect']}")
    target = args[0]
    if len(target) > MAX_NAME:
        return ParseError(f"The device name is longer than {MAX_NAME} characters.")
    rest = line.strip().split(None, 2)
    remote = rest[2].strip() if len(rest) > 2 else ""
    return Command("connect", target=target, remote_command=remote)


def _parse_target(name: str, args: list[str]) -> Command | ParseError:
    if len(args) != 1:
        return ParseError(f"{name} takes one device. Usage: {USAGE[name]}")
    if len(args[0]) > MAX_NAME:
        return ParseError(f"The device name is longer than {MAX_NAME} characters.")
    return Command(name, target=args[0])


def _page_number(value: str) -> int | None:
    if not value.isascii() or not value.isdigit() or len(value) > 6:
        return None
    number = int(value)
    return number if 1 <= number <= MAX_PAGE else None


def _is_control(ch: str) -> bool:
    """Control, format, surrogate and unassigned characters, except the tab."""
    return ch != "\t" and unicodedata.category(ch).startswith("C")


def _quote(word: str) -> str:
    shown = word if len(word) <= 40 else word[:40] + "..."
    return f"'{shown}'"
