"""The ``scbert`` command's help: every command and option explained, defaults shown, answered at once."""

from __future__ import annotations

import argparse
import inspect
import subprocess
import sys

import pytest

from scbert_tl import _cli


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


COMMANDS = sorted(_subparsers(_cli.build_parser()))


def test_every_command_is_listed_with_help():
    parser = _cli.build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {a.dest: a.help for a in action._choices_actions}
    assert set(helps) == set(COMMANDS) == {"annotate", "benchmark", "demo", "embed", "finetune", "pretrain"}
    assert all(text and text.strip() for text in helps.values()), helps


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_no_meaningless_default(command, capsys):
    parser = _subparsers(_cli.build_parser())[command]
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:  # a hidden deprecated spelling
            assert isinstance(action, _cli._common.DeprecatedAlias), action.option_strings
            continue
        assert action.help and action.help.strip(), (
            f"scbert {command}: {action.option_strings or action.dest} has no help"
        )
    with pytest.raises(SystemExit) as e:
        _cli.main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: scbert {command}")
    assert "%%" not in text and "%(" not in text
    assert "(default: None)" not in text and "(default: False)" not in text
    for action in parser._actions:  # a default that means something is shown
        shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
        if shown and action.help != argparse.SUPPRESS:
            assert "default" in action.help or f"(default: {action.default})" in " ".join(text.split()), action.dest


def test_one_spelling_of_out():
    for command, parser in _subparsers(_cli.build_parser()).items():
        outs = [a for a in parser._actions if a.dest == "out" and a.help != argparse.SUPPRESS]
        assert len(outs) == 1 and "--out" in outs[0].option_strings, command
        assert not any("--output" in a.option_strings and a.help != argparse.SUPPRESS for a in parser._actions)


def test_finetune_starts_from_the_same_model_in_python_and_the_shell():
    import scbert_tl as scbert

    python = inspect.signature(scbert.tl.finetune).parameters["model"].default
    shell = _subparsers(_cli.build_parser())["finetune"].get_default("model")
    assert python == shell == _cli._common.DEFAULT_MODEL == "compact"
    assert '``"compact"`` (the default, as in ``scbert finetune``)' in scbert.tl.finetune.__doc__


def test_help_states_the_finetuning_defaults():
    """The shell's help names the defaults the tool chooses for a new model and for trained weights."""
    from scbert_tl.tl._resolve import NEW_MODEL_FINETUNE, TRAINED_FINETUNE

    parsers = _subparsers(_cli.build_parser())
    finetune = ("epochs", "lr", "downsample", "mask_genes")
    for command, keys in (("finetune", finetune), ("benchmark", ("epochs", "lr", "patience"))):
        helps = {a.dest: a.help for a in parsers[command]._actions}
        for key in keys:
            new, trained = NEW_MODEL_FINETUNE[key], TRAINED_FINETUNE[key]
            expected = f"{new:g} for a new model, {trained:g} from trained weights"
            assert expected in helps[key], (command, key, helps[key])


def test_scbert_help_imports_nothing_heavy():
    """``scbert --help`` in a fresh process: it answers, and loads neither torch nor the AnnData stack."""
    code = (
        "import sys\n"
        "from scbert_tl._cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'pandas', 'anndata', 'scanpy') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: scbert" in proc.stdout and "Run 'scbert COMMAND --help'" in proc.stdout
    assert "HEAVY []" in proc.stdout
