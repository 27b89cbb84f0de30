"""`kernelwatch --help` and each subcommand's help read as plain text."""

from __future__ import annotations

import re

import pytest

from kernelwatch import cli


@pytest.mark.parametrize("command", [[], ["analyze"], ["summary"], ["pretrain"]])
def test_help_is_plain_text(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: kernelwatch")
    assert not re.search(r"``|:(class|func|meth|mod):`", text), text  # no reST markup


def test_every_option_says_what_it_does():
    parser = cli.build_parser()
    commands = next(action for action in parser._actions if action.dest == "command").choices
    for name, command in commands.items():
        assert command.description, name
        assert all(action.help for action in command._actions), name
