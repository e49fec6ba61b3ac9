"""The Gaussian kernel on the features through random Fourier features (method §5, ``kernel="rff_gaussian"``):
its bandwidth, the discriminator's psi features, a flow that lands on its target, training and sampling."""

import pytest
import torch

from latent_dmmd import DMMDDiscriminator, DMMDPipeline, DMMDScheduler
from latent_dmmd.flow import sample_flow
from latent_dmmd.mmd import median_pairwise_distance, random_fourier_features
from latent_dmmd.models.discriminator import RFF_BUCKETS
from latent_dmmd.reference import compute_reference_statistics

from .conftest import tiny_data


def rff_discriminator(num_features: int = 256, seed: int = 0) -> DMMDDiscriminator:
    torch.manual_seed(seed)
    return DMMDDiscriminator(
        sample_size=8, in_channels=3, block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4,
        kernel="rff_gaussian", rff_features=num_features, rff_seed=seed,
    )  # fmt: skip


def test_median_pairwise_distance_is_the_median_over_distinct_pairs():
    x = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for group, got in zip(x, median_pairwise_distance(x)):
        pairs = [torch.dist(group[i], group[j]) for i in range(7) for j in range(i + 1, 7)]
        assert got == torch.stack(pairs).median()
    with pytest.raises(ValueError, match="at least 2"):
        median_pairwise_distance(x[:, :1])


def test_discriminator_psi_features_estimate_the_gaussian_kernel_of_its_raw_features():
    """<psi(x), psi(y)> against exp(-|phi(x) - phi(y)|² / (2 l²)) at the level's bandwidth: the RFF error has
    standard deviation below sqrt(1 / R) = 0.011 at R = 8192; tolerance 0.05 over the 8 x 8 pairs."""
    disc = rff_discriminator(num_features=8192).eval()
    data = tiny_data(n=32)
    disc.calibrate_bandwidth(data)
    assert bool((disc.rff_bandwidth > 0).all()) and disc.feature_dim == 8192
    t = torch.full((8,), 420)
    with torch.no_grad():
        raw, psi = disc(data[:8], t, raw=True), disc(data[:8], t)
    assert raw.shape == (8, 3 * 8 * 8) and psi.shape == (8, 8192)
    bandwidth = disc.rff_bandwidth[disc.bandwidth_bucket(torch.tensor(420))]
    exact = torch.exp(-torch.cdist(raw, raw).square() / (2 * bandwidth**2))
    assert (psi @ psi.T - exact).abs().max() < 0.05
    # the same map as the module-level function with the model's seed (the frequencies are drawn one way)
    assert torch.allclose(psi, random_fourier_features(raw, bandwidth.expand(8), 8192, seed=0), atol=1e-5)
    # the calibrated bandwidth is the median feature distance of the data at the bucket's middle level
    with torch.no_grad():
        middle = disc(data, torch.full((32,), 425), raw=True)
    assert bandwidth == pytest.approx(median_pairwise_distance(middle[None])[0].item(), rel=1e-5)


def test_bandwidth_is_tracked_per_bucket_and_unmeasured_buckets_read_the_nearest_one():
    disc = rff_discriminator()
    with pytest.raises(ValueError, match="no bandwidth yet"):
        disc.bandwidth_at(torch.tensor([10]))
    clean = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    first = median_pairwise_distance(clean)
    disc.update_bandwidth(clean, torch.tensor([120, 130]))  # both groups in bucket 2: their mean, as it is
    bucket = int(disc.bandwidth_bucket(torch.tensor(120)))
    assert bucket == 2 and disc.rff_bandwidth[bucket] == pytest.approx(first.mean().item(), rel=1e-6)
    disc.update_bandwidth(clean[:1] * 3, torch.tensor([140]), decay=0.9)  # then a running average
    expected = 0.9 * first.mean() + 0.1 * 3 * first[0]
    assert disc.rff_bandwidth[bucket] == pytest.approx(expected.item(), rel=1e-6)
    assert int((disc.rff_bandwidth > 0).sum()) == 1
    before = disc.rff_bandwidth.clone()
    disc.update_bandwidth(torch.full_like(clean, float("nan")), torch.tensor([120, 990]))  # a non-finite step
    assert torch.equal(disc.rff_bandwidth, before)
    # every level reads bucket 2 until another bucket is measured
    assert torch.allclose(disc.bandwidth_at(torch.tensor([0, 120, 999])), disc.rff_bandwidth[bucket].expand(3))
    disc.update_bandwidth(clean[:1], torch.tensor([990]))
    far = disc.bandwidth_at(torch.tensor([999, 800, 300]))
    assert far[0] == far[1] == disc.rff_bandwidth[RFF_BUCKETS - 1] and far[2] == disc.rff_bandwidth[bucket]


def test_bad_kernel_settings_are_refused():
    with pytest.raises(ValueError, match="kernel="):
        DMMDDiscriminator(kernel="rbf")
    with pytest.raises(ValueError, match="MMD objective"):
        DMMDDiscriminator(kernel="rff_gaussian", objective="kale", projection_dim=1)
    with pytest.raises(ValueError, match="rff_features"):
        DMMDDiscriminator(kernel="rff_gaussian", rff_features=0)


def test_gaussian_kernel_flow_lands_on_the_target_mean_and_variance():
    """1-D, N(0, 1) particles to N(1.5, 0.7²) under psi of the identity features with a wide bandwidth (3,
    R = 1024, cached target mean over 20,000 samples): the flow matches mean and spread (tolerances 0.02 and
    0.03; measured 1.501 and 0.688). A narrow bandwidth (1) leaves the far tail repelled by its neighbours
    and attracted by nothing (std 1.47 after 1,000 steps): the stall noise injection is meant for."""
    phi = lambda x, t: random_fourier_features(x, 3.0, 1024, seed=1)
    target = 1.5 + 0.7 * torch.randn(20000, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    m_p = phi(target, None).mean(0, keepdim=True)
    z = torch.randn(400, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample_flow(phi, z, [0], m_p, flow_steps=250, update=20.0)
    assert out.mean().item() == pytest.approx(1.5, abs=0.02)
    assert out.std().item() == pytest.approx(0.7, abs=0.03)


def test_rff_pipeline_statistics_live_in_psi_space_and_sampling_is_data_free(tmp_path):
    disc = rff_discriminator(num_features=64).requires_grad_(False)
    data = tiny_data()
    disc.calibrate_bandwidth(data)
    sched = DMMDScheduler(num_inference_steps=3, flow_steps_per_level=2, step_size=1.0)
    sched.set_timesteps(3)
    stats = compute_reference_statistics(disc, [data], sched.timesteps, sched.alphas_cumprod,
                                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert stats.mean_data.shape == (3, 64)
    disc.set_reference_statistics(stats)
    pipe = DMMDPipeline(disc, sched)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(num_images=4, generator=torch.Generator().manual_seed(0), output_type="pt").images
    pipe.save_pretrained(tmp_path)
    loaded = DMMDPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(loaded.discriminator.rff_bandwidth, disc.rff_bandwidth)
    assert torch.equal(loaded.discriminator.rff_weight, disc.rff_weight)  # rebuilt from the seed, not stored
    again = loaded(num_images=4, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.allclose(images, again, atol=1e-6)
    # a changed bandwidth is a changed kernel: the statistics no longer describe it
    loaded.discriminator.rff_bandwidth.mul_(2)
    with pytest.raises(ValueError, match="stale reference statistics"):
        loaded(num_images=2, output_type="pt")


def test_training_measures_the_bandwidth_over_clean_and_noisy_features_pooled():
    """The loss hands the bandwidth hook both samples of each group, and the training step pools them: the
    median over all pairs of the 2n features, the median heuristic of the two-sample problem."""
    from latent_dmmd.mmd import dmmd_loss

    seen = {}
    phi = lambda x, t: x.flatten(1) * 2.0
    x0 = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    xt = x0 + 5.0
    dmmd_loss(phi, x0, xt, torch.tensor([100] * 4 + [700] * 4), 2, lambda_gp=0.0,
              on_raw_features=lambda c, n, levels: seen.update(clean=c, noisy=n, levels=levels))  # fmt: skip
    assert torch.equal(seen["clean"], (2 * x0).view(2, 4, 3)) and torch.equal(seen["noisy"], (2 * xt).view(2, 4, 3))
    assert seen["levels"].tolist() == [100, 700]


def test_pooled_bandwidth_keeps_the_pull_of_the_data_alive_at_far_noisy_points():
    """Clean features N(0, I_16), noisy ones shifted by 10 per coordinate (|shift| = 40). The witness at a noisy
    point is the data's kernel mean minus the particles' own; its first part is the only pull toward the data.
    With the clean-only median (about sqrt(2 * 16) = 5.7) the point sits about 7 bandwidths from the data and
    that pull is below 1e-9 (only the neighbours' local repulsion is left); the pooled median (about 37: it
    includes the cross pairs) leaves it above 1e-2. Exact kernel, no random features."""
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(64, 16, generator=g, dtype=torch.float64)
    noisy = torch.randn(64, 16, generator=g, dtype=torch.float64) + 10.0
    narrow = median_pairwise_distance(clean[None])[0]
    pooled = median_pairwise_distance(torch.cat([clean, noisy])[None])[0]
    assert narrow == pytest.approx((2 * 16) ** 0.5, rel=0.2) and pooled > 5 * narrow

    def pull_of_the_data(point, bandwidth):
        point = point.clone().requires_grad_(True)
        mean_kernel = torch.exp(-(point - clean).square().sum(-1) / (2 * bandwidth**2)).mean()
        (grad,) = torch.autograd.grad(mean_kernel, point)
        return grad.norm().item()

    assert pull_of_the_data(noisy[0], narrow) < 1e-9
    assert pull_of_the_data(noisy[0], pooled) > 1e-2
