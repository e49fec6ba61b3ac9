"""The calibrated step rule (method §5 "Defaults", issue 26): known answers with linear features, the
stored schedule read back by the scheduler, and a pipeline calibrated end to end."""

import math

import pytest
import torch

from latent_dmmd.calibration import calibrate_step_sizes, calibrated_step_size
from latent_dmmd.schedulers import DMMDScheduler


def identity(x, t):
    return x


def gaussian_data(n=2000, mean=(3.0, 0.0), seed=0):
    return torch.tensor(mean) + torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))


def test_linear_features_find_the_analytic_step():
    """phi(x) = x, data N(mu, I), particles N(0, I): one flow step moves the ensemble mean by eta (mu - mean) and
    keeps the covariance (I, like every forward marginal here), so the step that lands on the next level's marginal
    N(alpha_{k+1} mu, I) is eta* = alpha_{k+1} from noise. The search must find it to its resolution."""
    sched = DMMDScheduler()
    data = gaussian_data()
    grid = [600, 300, 100]
    reference = data.mean(0).expand(len(grid), 2)  # m_P(t) of phi = x is the data mean at every level
    gen = torch.Generator().manual_seed(1)
    cal = calibrate_step_sizes(identity, data, grid, sched.alphas_cumprod, reference, flow_steps=1, generator=gen,
                               factor=1.05)  # fmt: skip
    alpha = sched.alphas_cumprod.sqrt()
    # level 0 starts at mean 0: eta* = alpha(300) (about 0.52, far from the search's start 0.01)
    assert abs(math.log(cal.step_sizes[0] / float(alpha[300]))) < 0.1
    assert cal.timesteps == grid and cal.flow_steps == 1 and cal.num_particles == 2000


def test_calibrated_flow_lands_on_the_data_mean_and_variance():
    sched = DMMDScheduler()
    data = gaussian_data(mean=(-2.0, 1.5))
    grid = [999, 700, 400, 100, 0]
    reference = data.mean(0).expand(len(grid), 2)
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(3))
    cal = calibrate_step_sizes(identity, data, grid, sched.alphas_cumprod, reference, flow_steps=4, noise=noise,
                               generator=torch.Generator().manual_seed(4), factor=1.05)  # fmt: skip
    from latent_dmmd.flow import euler_update, sample_flow

    z = sample_flow(identity, noise, grid, reference, flow_steps=4, update=euler_update(cal.step_sizes))
    assert torch.allclose(z.mean(0), data.mean(0), atol=0.05)
    assert torch.allclose(z.std(0), torch.ones(2), atol=0.05)  # linear features leave the covariance alone
    assert len(cal.distances) == len(grid) and all(len(d) >= 3 for d in cal.distances)


def test_blow_up_counts_as_far_and_is_not_chosen():
    """A feature map whose flow diverges for large steps: the search must stop below the cliff."""
    sched = DMMDScheduler()
    data = gaussian_data(mean=(1.0, 1.0))

    def cubic(x, t):  # gradient grows like x^2: big steps overshoot and explode
        return torch.cat([x, x**3 / 3], 1)

    reference = cubic(data, None).mean(0).expand(2, 4)
    cal = calibrate_step_sizes(cubic, data[:500], [300, 0], sched.alphas_cumprod, reference, flow_steps=5,
                               generator=torch.Generator().manual_seed(0), start=8.0)  # fmt: skip
    assert all(math.isfinite(s) and s < 8.0 for s in cal.step_sizes)
    assert any(math.isinf(d) for level in cal.distances for d in level.values())  # it did see the cliff


def test_calibrated_step_size_reads_back_interpolates_and_scales():
    ts, etas = [999, 499, 0], [0.4, 0.1, 0.025]
    assert calibrated_step_size(499, ts, etas, 10, 10) == pytest.approx(0.1)
    assert calibrated_step_size(749, ts, etas, 10, 10) == pytest.approx(math.sqrt(0.4 * 0.1), rel=1e-3)  # log-linear
    assert calibrated_step_size(499, ts, etas, 10, 20) == pytest.approx(0.05)  # twice the steps, half each
    assert calibrated_step_size(2000, ts, etas, 10, 10) == pytest.approx(0.4)  # flat beyond the ends


def test_scheduler_calibrated_schedule():
    sched = DMMDScheduler(num_inference_steps=3, flow_steps_per_level=2, step_size_schedule="calibrated",
                          calibrated_timesteps=[999, 500, 0], calibrated_step_sizes=[0.3, 0.2, 0.1],
                          calibrated_flow_steps=2)  # fmt: skip
    assert sched.step_sizes() == pytest.approx([0.3, 0.2, 0.1])
    assert sched.step_sizes(step_size=2.0) == pytest.approx([0.6, 0.4, 0.2])  # eta multiplies the calibration
    assert sched.step_sizes(flow_steps=4) == pytest.approx([0.15, 0.1, 0.05])
    z, g = torch.zeros(4, 2), torch.ones(4, 2)
    assert torch.allclose(sched.step(g, 500, z).prev_sample, torch.full((4, 2), -0.2))
    reloaded = DMMDScheduler.from_config(sched.config)
    assert reloaded.step_sizes() == pytest.approx([0.3, 0.2, 0.1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"step_size_schedule": "calibrated"}, "needs calibrated_timesteps"),
        ({"step_size_schedule": "calibrated", "calibrated_timesteps": [999, 0], "calibrated_step_sizes": [0.1],
          "calibrated_flow_steps": 10}, "one length"),  # fmt: skip
        ({"step_size_schedule": "calibrated", "calibrated_timesteps": [999], "calibrated_step_sizes": [-0.1],
          "calibrated_flow_steps": 10}, "calibrated_step_sizes"),  # fmt: skip
        ({"step_size": -1.0}, "step_size must be a finite number > 0"),
        ({"step_size": 0.0}, "step_size must be a finite number > 0"),
        ({"step_size": "1.0"}, "step_size must be a finite number > 0"),
        ({"step_size": float("nan")}, "step_size must be a finite number > 0"),
    ],
)
def test_scheduler_refuses_unreadable_step_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DMMDScheduler(**kwargs)


def test_pipeline_calibration_round_trip(tmp_path, pipe):
    """calibrate_pipeline stores the steps in the scheduler; a saved and reloaded pipeline samples with them."""
    from latent_dmmd import DMMDPipeline
    from latent_dmmd.calibration import calibrate_pipeline


    data = torch.rand(32, *pipe.particle_shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cal = calibrate_pipeline(pipe, data, generator=torch.Generator().manual_seed(0), progress=False)
    c = pipe.scheduler.config
    assert c.step_size_schedule == "calibrated" and c.step_size == 1.0
    assert c.calibrated_step_sizes == pytest.approx(cal.step_sizes) and len(cal.step_sizes) == c.num_inference_steps
    pipe.save_pretrained(tmp_path)
    loaded = DMMDPipeline.from_pretrained(tmp_path)
    assert loaded.scheduler.step_sizes() == pytest.approx(cal.step_sizes)
    out = loaded(num_images=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="shaped like the particles"):
        calibrate_pipeline(pipe, data[:, :1])


def test_cli_calibrate_stores_the_steps_and_refuses_without_a_destination(tmp_path, pipe, capsys):
    from latent_dmmd import DMMDPipeline
    from latent_dmmd.cli import main as cli

    from .conftest import write_image_folder

    pipe.save_pretrained(tmp_path / "m")
    write_image_folder(tmp_path / "train", n=12, size=8)
    assert cli(["calibrate", str(tmp_path / "m"), "--data", str(tmp_path / "train")]) == 2
    assert "--output" in capsys.readouterr().err
    assert cli(["calibrate", str(tmp_path / "m"), "--data", str(tmp_path / "train"), "--output", str(tmp_path / "c"),
                "--no-select"]) == 0  # fmt: skip
    assert "calibrated on 12 images" in capsys.readouterr().out
    calibrated = DMMDPipeline.from_pretrained(tmp_path / "c")
    c = calibrated.scheduler.config
    assert c.step_size_schedule == "calibrated" and len(c.calibrated_step_sizes) == c.num_inference_steps
    # by default the calibrated steps compete with constant steps on where the whole flow lands
    assert cli(["calibrate", str(tmp_path / "m"), "--data", str(tmp_path / "train"), "--output", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "lands closest to them: " in out and "constant 1 " in out
    chosen = out.split("lands closest to them: ")[1].split(" (")[0]
    c = DMMDPipeline.from_pretrained(tmp_path / "s").scheduler.config
    assert c.step_size_schedule == ("calibrated" if chosen == "calibrated" else "constant")
    assert DMMDPipeline.from_pretrained(tmp_path / "m").scheduler.config.step_size_schedule == "constant"  # untouched


def test_the_selection_prefers_the_constant_step_that_lands_on_the_data():
    """phi(x) = x, data N(mu, I): a constant step eta multiplies the ensemble mean's error by (1 - eta) per step and
    keeps the covariance, so eta = 1 lands exactly on the data, 1/3 leaves (2/3)^3 of the error after 3 steps and 3
    diverges. A calibrated rule with steps of 0.01 barely moves. The ladder from 1 must choose eta 1 over the
    calibrated rule and both neighbours."""
    from latent_dmmd.calibration import choose_step_rule
    from latent_dmmd.flow import sample_flow

    data = gaussian_data(mean=(3.0, -2.0))
    grid = [999, 400, 0]
    reference = data.mean(0).expand(len(grid), 2)
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5))

    def final(step_size_schedule=None, step_size=None):
        eta = 0.01 if step_size_schedule is None else step_size  # no overrides: the (tiny) calibrated steps
        return sample_flow(identity, noise.clone(), grid, reference, flow_steps=1, update=eta)

    selection = choose_step_rule(final, data, calibrated=True)
    assert selection.chosen == "constant 1" and selection.eta == 1.0
    assert set(selection.distances) == {"calibrated", "constant 1", "constant 3", "constant 0.3333"}
    assert selection.distances["constant 1"] < 0.01 < selection.distances["constant 0.3333"] < selection.distances["calibrated"]
    assert math.isinf(selection.distances["constant 3"]) or selection.distances["constant 3"] > 1


def test_the_selection_keeps_the_calibrated_steps_when_every_constant_blows_up():
    """Every constant flow raises (the sampler's non-finite guard): each counts as infinitely far, is recorded as
    such, and the finite calibrated rule is kept; without a finite candidate the selection refuses."""
    from latent_dmmd.calibration import choose_step_rule

    data = gaussian_data(mean=(1.0, 1.0))
    calls = []

    def final(step_size_schedule=None, step_size=None):
        calls.append(step_size)
        if step_size_schedule is None:
            return data + 0.1
        raise FloatingPointError("non-finite particles")

    selection = choose_step_rule(final, data, calibrated=True)
    assert selection.chosen == "calibrated" and selection.eta is None
    assert math.isfinite(selection.distances["calibrated"])
    constants = {k: v for k, v in selection.distances.items() if k != "calibrated"}
    assert len(constants) == len(calls) - 1 >= 2 and all(math.isinf(v) for v in constants.values())
    with pytest.raises(FloatingPointError, match="every step size"):
        choose_step_rule(final, data, calibrated=False)


def test_select_step_rule_replaces_the_scheduler_with_the_flow_that_lands_closest(pipe):
    """The pipeline wrapper: each candidate's recorded distance is the energy distance of that very sampler's final
    particles from the same noise (recomputed here through the public call), and the winner is what is stored."""
    from latent_dmmd import DMMDPipeline
    from latent_dmmd.calibration import calibrate_pipeline, select_step_rule
    from latent_dmmd.mmd import energy_distance

    data = torch.rand(32, *pipe.particle_shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    calibrate_pipeline(pipe, data, generator=torch.Generator().manual_seed(0), progress=False)
    calibrated = pipe.scheduler
    selection = select_step_rule(pipe, data, generator=torch.Generator().manual_seed(7))
    assert selection.chosen == min(selection.distances, key=selection.distances.get)
    assert "calibrated" in selection.distances and "constant 1" in selection.distances
    noise = torch.randn((32, *pipe.particle_shape), generator=torch.Generator().manual_seed(7))
    for label, distance in selection.distances.items():
        overrides = {} if label == "calibrated" else {"step_size_schedule": "constant", "step_size": float(label.split()[1])}
        variant = DMMDPipeline(pipe.discriminator, type(calibrated).from_config(calibrated.config, **overrides))
        variant.set_progress_bar_config(disable=True)
        z = variant(num_images=32, latents=noise.clone(), output_type="latent").images
        assert float(energy_distance(z, data)) == pytest.approx(distance, rel=1e-3, abs=1e-4), label
    c = pipe.scheduler.config
    if selection.eta is None:
        assert c.step_size_schedule == "calibrated"
    else:
        assert c.step_size_schedule == "constant" and c.step_size == selection.eta
    assert selection.as_record()["chosen"] == selection.chosen and selection.as_record()["num_particles"] == 32
