import torch

from nested_attention_toy.assets import shipped_path
from nested_attention_toy.autoencoder import make_vae, reconstruction_psnr, round_trip
from nested_attention_toy.latent_check import latent_check, main
from nested_attention_toy.world import FACTOR_NAMES


def test_round_trip_keeps_shape_and_dtype():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    out = round_trip(make_vae(width=16).eval(), images, batch_size=2)
    assert out.shape == images.shape and out.dtype == torch.uint8


def test_round_trip_is_what_the_psnr_measures():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    vae = make_vae(width=16).eval()
    out = round_trip(vae, images, batch_size=2).float()
    mse = (out - images.float()).pow(2).flatten(1).mean(1)
    naive = float((10 * torch.log10(255 ** 2 / mse)).mean())
    assert abs(naive - reconstruction_psnr(vae, images, batch_size=3)) < 0.05  # only the uint8 rounding differs


def test_latent_check_reports_every_factor_and_domain_and_the_shipped_vae_keeps_the_frame(capsys):
    torch.manual_seed(0)
    untrained = latent_check(make_vae(width=16), shipped_path("metrics"), renders=40, identities=5, queries=2, workers=1)
    assert set(untrained["factors"]) == set(FACTOR_NAMES)
    assert set(untrained["id_top1"]) == {"person", "pet"}
    assert all(0 <= v <= 1 for v in [*untrained["factors"].values(), *untrained["id_top1"].values()])
    main(["--renders", "60", "--identities", "5"])  # the shipped VAE
    printed = capsys.readouterr().out
    assert "factors read on reconstructions: scene" in printed and "identity top-1 of reconstructions: person" in printed
    position = float(printed.split("position ")[1].split(" %")[0])
    assert position > 90 and untrained["factors"]["position"] < 0.9  # the trained latents keep where the subject is


def test_a_folder_that_is_not_a_build_gets_one_sentence_and_exit_2(tmp_path, capsys):
    assert main(["--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a toy build's pipeline folder" in err and len(err.splitlines()) == 1
    assert main(["--metrics", str(tmp_path / "missing")]) == 2
    assert "not a toy build's metrics folder" in capsys.readouterr().err
    assert main(["--identities", "1"]) == 2
    assert "expected at least 1 render and 2 identities" in capsys.readouterr().err


def test_a_build_root_is_taken_for_its_parts():
    from nested_attention_toy.assets import build_part

    assert build_part(shipped_path(), "pipeline", "vae/config.json") == shipped_path("pipeline")
    assert build_part(shipped_path("metrics"), "metrics", "factor_classifier/config.json") == shipped_path("metrics")
