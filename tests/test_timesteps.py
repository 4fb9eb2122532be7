"""Timestep bias and min-SNR loss weighting: the sampling distribution, the weights against their formula, the loss."""

import pytest
import torch
from diffusers import DDPMScheduler

from nested_attention.errors import NestedAttentionError
from nested_attention_train.step import NestedTrainingModule
from nested_attention_train.timesteps import sample_timesteps, snr_loss_weights, timestep_weights
from test_train import make_triplets, run, training_parts


def test_bias_weights_cover_exactly_the_chosen_timesteps():
    assert timestep_weights("none", 1000, multiplier=3) is None
    assert timestep_weights("later", 1000, multiplier=1) is None  # a multiplier of 1 is uniform sampling
    later = timestep_weights("later", 1000, multiplier=3, portion=0.25)
    assert torch.equal(later[750:], torch.full((250,), 3.0)) and torch.equal(later[:750], torch.ones(750))
    earlier = timestep_weights("earlier", 1000, multiplier=0.5, portion=0.1)
    assert torch.equal(earlier[:100], torch.full((100,), 0.5)) and torch.equal(earlier[100:], torch.ones(900))
    span = timestep_weights("range", 1000, multiplier=2, begin=200, end=300)
    assert span.sum() == 1100 and torch.equal(span[200:300], torch.full((100,), 2.0))
    with pytest.raises(NestedAttentionError, match="begins at 1000"):
        timestep_weights("range", 1000, multiplier=2, begin=1000, end=1200)


def test_sampled_timesteps_follow_the_bias():
    torch.manual_seed(0)
    n = 20000
    uniform = sample_timesteps(None, 1000, n, "cpu")
    assert uniform.min() >= 0 and uniform.max() <= 999
    biased = sample_timesteps(timestep_weights("later", 1000, multiplier=3, portion=0.5), 1000, n, "cpu")
    # P(t >= 500) = 3 * 500 / (3 * 500 + 500) = 0.75; the binomial standard error at n = 20000 is 0.003
    assert abs((biased >= 500).float().mean().item() - 0.75) < 0.02
    assert abs((uniform >= 500).float().mean().item() - 0.5) < 0.02


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_match_their_formula(prediction):
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction)
    t = torch.tensor([0, 10, 100, 400, 999])
    weights = snr_loss_weights(scheduler, t, gamma=5.0)
    a = scheduler.alphas_cumprod[t].double()
    snr = a / (1 - a)  # the signal-to-noise ratio of x_t = sqrt(a) x_0 + sqrt(1 - a) eps
    expected = {"epsilon": snr.clamp(max=5) / snr, "v_prediction": snr.clamp(max=5) / (snr + 1),
                "sample": snr.clamp(max=5)}[prediction]
    # compute_snr works in float32 from square roots: 1e-5 relative is its rounding, far below the weights' spread
    torch.testing.assert_close(weights.double(), expected, rtol=1e-5, atol=0)
    if prediction == "epsilon":
        assert weights[-1] == 1 and weights[0] < 0.01  # noisy steps keep their weight, nearly clean ones lose it


def test_a_gamma_above_every_snr_leaves_the_epsilon_loss_unchanged(tmp_path):
    """With gamma above the largest SNR every epsilon weight is 1: the weighted loss is the plain MSE."""
    base, adapter, controller, batch = training_parts([f"data={make_triplets(tmp_path)}"])
    largest = (base.noise_scheduler.alphas_cumprod / (1 - base.noise_scheduler.alphas_cumprod)).max().item()
    losses = []
    for gamma in (None, 2 * largest):
        torch.manual_seed(0)
        with torch.no_grad():
            losses.append(NestedTrainingModule(adapter, base, controller, snr_gamma=gamma)(batch).item())
        controller.clear()
    # the same numbers, averaged per sample first: equal up to float32 summation order
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    torch.manual_seed(0)
    with torch.no_grad():
        weighted = NestedTrainingModule(adapter, base, controller, snr_gamma=1.0)(batch).item()
    controller.clear()
    assert weighted < losses[0]  # gamma 1 scales every step with SNR above 1 down


def test_biased_and_weighted_training_runs_and_bad_values_are_one_sentence(tmp_path, capsys):
    folder = make_triplets(tmp_path / "data")
    assert run(f"data={folder}", f"output_dir={tmp_path / 'out'}", "max_steps=2", "snr_gamma=5",
               "timestep_bias_strategy=later", "timestep_bias_multiplier=3", "timestep_bias_portion=0.5") == 0
    assert (tmp_path / "out/adapter/nested_adapter.safetensors").is_file()
    capsys.readouterr()
    for bad, said in (("timestep_bias_strategy=late", "expected one of none, later, earlier, range"),
                      ("timestep_bias_multiplier=0", "`timestep_bias_multiplier` is 0"),
                      ("snr_gamma=-1", "`snr_gamma` is -1"),
                      ("timestep_bias_portion=1.5", "`timestep_bias_portion` is 1.5")):
        assert run(f"data={folder}", bad) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err
