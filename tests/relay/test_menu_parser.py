"""The menu line parser: every line becomes a Command or a one-line error, never an exception."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.technician.commands import MAX_LINE, Command, ParseError, parse


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("", Command("")),
        ("   ", Command("")),
        ("list", Command("list")),
        ("LIST nas --page 3", Command("list", pattern="nas", page=3)),
        ("list --page=2", Command("list", page=2)),
        ("connect nas-1", Command("connect", target="nas-1")),
        ("c NAS-1", Command("connect", target="NAS-1")),
        ("sd abc123", Command("connect", target="abc123")),
        ("connect nas-1 exit 7", Command("connect", target="nas-1", remote_command="exit 7")),
        (
            "connect nas-1   ls -l | wc -l",
            Command("connect", target="nas-1", remote_command="ls -l | wc -l"),
        ),
        ("show nas-1", Command("show", target="nas-1")),
        ("repair nas-1", Command("repair", target="nas-1")),
        ("close abcdefghjk", Command("close", target="abcdefghjk")),
        ("help", Command("help")),
        ("whoami", Command("whoami")),
        ("exit", Command("exit")),
        ("quit", Command("exit")),
    ],
)
def test_valid_lines(line: str, expected: Command) -> None:
    """Each documented command form parses to the expected Command."""
    assert parse(line) == expected


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("rm -rf /", "Unknown command 'rm'"),
        ("connect", "Which device?"),
        ("show", "show takes one device"),
        ("show a b", "show takes one device"),
        ("list --page", "--page needs a number"),
        ("list --page 0", "--page must be a number"),
        ("list --page -1", "--page must be a number"),
        ("list --page \u0661", "--page must be a number"),  # an Arabic-Indic digit
        ("list a b", "one pattern"),
        ("list --all", "Unknown option"),
        ("whoami now", "takes no arguments"),
        ("connect \x1b[31mred", "control characters"),
        ("help\x00", "control characters"),
        ("x" * (MAX_LINE + 1), "too long"),
        ("connect " + "a" * 300, "longer than"),
    ],
)
def test_invalid_lines(line: str, fragment: str) -> None:
    """Malformed lines get one clear line saying what is wrong."""
    result = parse(line)
    assert isinstance(result, ParseError)
    assert fragment in result.message
    assert "\n" not in result.message


def test_shell_metacharacters_are_plain_text() -> None:
    """Quotes, $() and ; are never interpreted: they are parts of words."""
    assert parse("connect $(reboot);") == Command("connect", target="$(reboot);")
    assert parse("show 'nas 1'") == ParseError("show takes one device. Usage: show DEVICE")


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=5000))
def test_any_text_parses_or_errors(line: str) -> None:
    """Arbitrary text, control characters included, yields a Command or a one-line error."""
    result = parse(line)
    assert isinstance(result, Command | ParseError)
    if isinstance(result, ParseError):
        assert "\n" not in result.message and len(result.message) < 200


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "list",
                "c",
                "connect",
                "show",
                "--page",
                "3",
                ";",
                "|",
                "$(x)",
                "`id`",
                "&&",
                "\x07",
                "\u202e",
                "é",
            ]
        ),
        max_size=12,
    )
)
def test_word_soup_parses_or_errors(words: list[str]) -> None:
    """Combinations of commands, options and shell metacharacters never raise."""
    assert isinstance(parse(" ".join(words)), Command | ParseError)
