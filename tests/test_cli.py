"""One CLI: every option has help, option names mean one thing across subcommands, --version works."""
import argparse

import pytest

from prunedrive.app.cli import build_parser, main


def _subcommands():
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_every_option_of_every_subcommand_has_help():
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, p in _subcommands().items()
               for a in p._actions if not isinstance(a, argparse._HelpAction) and not a.help]
    assert not missing, missing


def test_out_means_the_results_root_wherever_it_appears():
    for name, p in _subcommands().items():
        for action in p._actions:
            if "--out" in action.option_strings:
                assert "results" in action.help, (name, action.help)  # never a model directory


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("prunedrive ")


def test_list_valued_options_take_several_values():
    args = build_parser().parse_args(["run", "--agent", "expert", "constant", "--seeds", "1", "2"])
    assert args.agent == ["expert", "constant"] and args.seeds == [1, 2]
    args = build_parser().parse_args(["run", "--agent", "expert", "--agent", "constant"])
    assert args.agent == ["expert", "constant"]


def test_a_hub_name_is_refused_with_a_message_and_the_zoo(capsys):
    assert main(["run", "--agent", "text-llm", "--model", "Qwen/Qwen2-0.5B", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "model hub name" in err and "nothing is downloaded" in err and "model zoo" in err
