"""`nested-attention toy diagnose`: every diagnostic is listed by --help and answers bad input with one sentence."""

import pytest

from nested_attention_cli.toy import DIAGNOSTICS
from test_cli import run_cli


def test_help_lists_every_diagnostic(capsys):
    assert run_cli("toy", "diagnose", "--help") == 0
    out = capsys.readouterr().out
    for name, (_, summary) in DIAGNOSTICS.items():
        assert name in out and summary[:30] in out, name


@pytest.mark.parametrize("name", list(DIAGNOSTICS))
def test_each_diagnostic_has_its_own_help(name, capsys):
    assert run_cli("toy", "diagnose", name, "--help") == 0
    assert capsys.readouterr().out.startswith(f"usage: nested-attention toy diagnose {name} ")


@pytest.mark.parametrize("name", [n for n in DIAGNOSTICS if n != "report"])
def test_a_folder_that_is_not_a_build_gets_one_sentence(name, tmp_path, capsys):
    assert run_cli("toy", "diagnose", name, "--model", str(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err


def test_report_of_a_missing_build_gets_one_sentence(tmp_path, capsys):
    assert run_cli("toy", "diagnose", "report", str(tmp_path / "missing")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1


def test_an_unknown_diagnostic_is_refused(capsys):
    assert run_cli("toy", "diagnose", "nonsense") == 2


@pytest.mark.parametrize("count, fragment", [("1", "at least 2"), ("100000", "at most")])
def test_toy_eval_refuses_identity_counts_retrieval_cannot_use(count, fragment, tmp_path, capsys):
    assert run_cli("toy", "eval", "--out", str(tmp_path / "eval"), "--identities", count) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and fragment in err and len(err.splitlines()) == 1
    assert not (tmp_path / "eval").exists()
