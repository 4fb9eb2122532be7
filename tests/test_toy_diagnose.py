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


def test_the_oracle_encoder_reads_attributes_and_nothing_else():
    """Its tokens are a function of the identity's attribute values: two input views of one identity give the same
    tokens, and identities that differ in one attribute differ in that attribute's token only."""
    import numpy as np
    import torch

    from nested_attention.adapter import load_image_encoder
    from nested_attention.encoder import preprocess
    from nested_attention_eval.toy_oracle_encoder import OracleEncoder
    from nested_attention_toy.assets import shipped_path
    from nested_attention_toy.metric_models import IdentityNet
    from nested_attention_toy.render import render_input
    from nested_attention_toy.world import attribute_names, identity_from_names, sample_identities

    clip, processor = load_image_encoder("toy")
    torch.manual_seed(0)
    encoder = OracleEncoder(clip, processor, IdentityNet.from_pretrained(shipped_path("metrics/identity_person")),
                            "person", width=32)
    base = sample_identities("person", 1, np.random.default_rng(3), held_out=True)[0]
    values = base.as_dict()
    changed = dict(values, hair_color=next(v for v in ("red", "black", "blond") if v != values["hair_color"]))
    other = identity_from_names("person", **changed)
    images = [render_input(base, 64, 1), render_input(base, 64, 2), render_input(other, 64, 1)]
    with torch.no_grad():
        tokens = encoder(preprocess(processor, images, torch.device("cpu"), torch.float32))
    assert tokens.shape == (3, len(attribute_names("person")), 32)
    assert torch.equal(tokens[0], tokens[1])
    differs = (tokens[0] - tokens[2]).abs().amax(-1) > 0
    assert differs.tolist() == [name == "hair_color" for name in attribute_names("person")]
