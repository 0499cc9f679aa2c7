"""The regularizers and losses as pure functions, each against an independent computation.

Reference values come from plain float64 loops or from torch.autograd.functional.jacobian, never
from the formula under test. Every random draw is seeded.
"""

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from shared.specs import (
    ConvModelSpec,
    DenseModelSpec,
    GaussianNoiseSpec,
    MaskingNoiseSpec,
    SaltPepperNoiseSpec,
)
from workers.losses import reconstruction_loss
from workers.models import ConvAutoencoder, DenseAutoencoder
from workers.objectives import (
    contractive_closed_form,
    contractive_estimate,
    corrupt,
    jacobian_frobenius,
    kl_sparsity,
    l1_sparsity,
)

# ---------------------------------------------------------------------------------------------
# helpers


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def per_sample_jacobians(
    encoder: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, create_graph: bool = False
) -> list[torch.Tensor]:
    """J_b = d encoder(x_b) / d x_b, (K, D) each, one autograd.functional.jacobian per sample."""

    def single(v: torch.Tensor) -> torch.Tensor:
        return encoder(v.unsqueeze(0)).squeeze(0)

    jacobians = []
    for row in x:
        jac = torch.autograd.functional.jacobian(single, row, create_graph=create_graph)
        assert isinstance(jac, torch.Tensor)
        jacobians.append(jac)
    return jacobians


def exact_mean_squared_frobenius(
    encoder: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> float:
    return float(torch.stack([j.pow(2).sum() for j in per_sample_jacobians(encoder, x)]).mean())


def kl_by_hand(h: torch.Tensor, rho: float) -> float:
    """sum_j rho log(rho / m_j) + (1 - rho) log((1 - rho) / (1 - m_j)), m_j the column mean."""
    rows = h.double().tolist()
    batch, units = len(rows), len(rows[0])
    total = 0.0
    for j in range(units):
        mean_j = sum(rows[b][j] for b in range(batch)) / batch
        total += rho * math.log(rho / mean_j) + (1 - rho) * math.log((1 - rho) / (1 - mean_j))
    return total


def dense_encoder(
    input_dim: int, hidden: tuple[int, ...], latent: int, activation: str, code: str, seed: int
) -> DenseAutoencoder:
    torch.manual_seed(seed)
    spec = DenseModelSpec(
        hidden=hidden, latent_dim=latent, activation=activation, code_activation=code
    )
    return DenseAutoencoder(spec, input_dim, "linear").double()


# ---------------------------------------------------------------------------------------------
# sparsity


@pytest.mark.parametrize("rho", [0.05, 0.2, 0.5, 0.9])
def test_kl_sparsity_matches_the_formula_by_hand(rho: float) -> None:
    h = torch.sigmoid(torch.randn(37, 11, dtype=torch.float64, generator=seeded(1)) * 2.0)
    expected = kl_by_hand(h, rho)
    got = float(kl_sparsity(h, rho))
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)
    # float32 codes (what training feeds it) agree to float32 precision
    assert float(kl_sparsity(h.float(), rho)) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("rho", [0.05, 0.3, 0.7])
def test_kl_sparsity_is_zero_when_every_unit_mean_is_rho(rho: float) -> None:
    # Rows rho + d and rho - d: each unit's batch mean is rho while single codes are not.
    deviation = torch.rand(16, 9, dtype=torch.float64, generator=seeded(2)) * min(rho, 1 - rho)
    h = torch.cat([rho + deviation, rho - deviation])
    assert torch.allclose(h.mean(dim=0), torch.full((9,), rho, dtype=torch.float64))
    assert abs(float(kl_sparsity(h, rho))) < 1e-12


def test_kl_sparsity_is_positive_when_a_unit_mean_differs_from_rho() -> None:
    rho = 0.1
    generator = seeded(3)
    for shift in (1e-3, 0.05, 0.3, -0.05):
        h = torch.full((20, 6), rho, dtype=torch.float64)
        h[:, int(torch.randint(6, (1,), generator=generator))] += shift  # one unit off target
        value = float(kl_sparsity(h, rho))
        assert value > 0.0
        assert value == pytest.approx(kl_by_hand(h, rho), rel=1e-9)
    random_codes = torch.rand(50, 8, dtype=torch.float64, generator=generator)
    assert float(kl_sparsity(random_codes, rho)) > 0.0


def test_l1_sparsity_matches_a_loop() -> None:
    h = torch.randn(23, 7, dtype=torch.float64, generator=seeded(4))
    rows = h.tolist()
    expected = sum(sum(abs(v) for v in row) for row in rows) / len(rows)
    assert float(l1_sparsity(h)) == pytest.approx(expected, rel=1e-12)
    assert float(l1_sparsity(torch.zeros(5, 3))) == 0.0


# ---------------------------------------------------------------------------------------------
# contraction


def test_contractive_closed_form_equals_the_autograd_jacobian() -> None:
    model = dense_encoder(12, (), 5, "linear", "sigmoid", seed=5)
    linear = model.first_layer_if_single_sigmoid()
    assert isinstance(linear, nn.Linear)
    assert linear is next(model.encoder.children())
    x = torch.randn(9, 12, dtype=torch.float64, generator=seeded(6))
    h = model.encoder(x)
    assert torch.allclose(h, torch.sigmoid(x @ linear.weight.T + linear.bias))
    closed = float(contractive_closed_form(h, linear.weight).detach())
    exact = exact_mean_squared_frobenius(model.encoder, x)
    assert exact > 0.0
    assert abs(closed - exact) / exact < 1e-5


@pytest.mark.parametrize(
    ("hidden", "code"),
    [((16,), "sigmoid"), ((), "tanh"), ((), "linear"), ((8, 4), "sigmoid")],
)
def test_first_layer_if_single_sigmoid_is_none_otherwise(
    hidden: tuple[int, ...], code: str
) -> None:
    model = dense_encoder(10, hidden, 3, "sigmoid", code, seed=7)
    assert model.first_layer_if_single_sigmoid() is None


def test_contractive_estimate_is_unbiased_for_a_deep_encoder() -> None:
    """2000 one-projection draws: their mean lies within 4 standard errors of the exact value.

    A call on x repeated r times averages r independent draws (v is drawn per row), so 100 calls
    on 20 copies are 2000 draws; the spread of the 100 call values gives the standard error.
    """
    model = dense_encoder(10, (32,), 4, "tanh", "tanh", seed=8)
    x = torch.randn(8, 10, dtype=torch.float64, generator=seeded(9))
    exact = exact_mean_squared_frobenius(model.encoder, x)
    calls, copies = 100, 20
    repeated = x.repeat(copies, 1)
    torch.manual_seed(10)
    values = torch.tensor(
        [float(contractive_estimate(model.encoder, repeated, 1).detach()) for _ in range(calls)],
        dtype=torch.float64,
    )
    standard_error = float(values.std()) / math.sqrt(calls)
    assert standard_error > 0.0
    assert abs(float(values.mean()) - exact) < 4 * standard_error
    # one draw on x alone is a noisy number: v really is random
    single = torch.tensor(
        [float(contractive_estimate(model.encoder, x, 1).detach()) for _ in range(20)]
    )
    assert float(single.std()) > 0.05 * exact


def test_contractive_estimate_is_the_mean_over_projections_of_jt_v_squared() -> None:
    """For the same v draws, the value and its parameter gradients match an explicit J^T v."""
    model = dense_encoder(6, (32,), 4, "tanh", "tanh", seed=11)
    x = torch.randn(5, 6, dtype=torch.float64, generator=seeded(12))
    params = list(model.encoder.parameters())
    projections = 3

    torch.manual_seed(13)
    estimate = contractive_estimate(model.encoder, x, projections)
    estimate.backward()  # one ordinary backward, as inside DDP
    grads = [p.grad for p in params]
    assert all(g is not None for g in grads)
    estimate_grads = [g.clone() for g in grads if g is not None]
    assert all(bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0 for g in estimate_grads)
    model.zero_grad(set_to_none=True)

    # The same draws (the encoder's forward consumes no random numbers), an explicit Jacobian.
    torch.manual_seed(13)
    vs = [torch.randn(len(x), 4, dtype=torch.float64) for _ in range(projections)]
    jacobians = per_sample_jacobians(model.encoder, x, create_graph=True)  # (K, D) each
    reference = torch.stack(
        [
            torch.stack([(j.T @ v[b]).pow(2).sum() for b, j in enumerate(jacobians)]).mean()
            for v in vs
        ]
    ).mean()
    assert float(estimate.detach()) == pytest.approx(float(reference.detach()), rel=1e-10)
    reference.backward()
    for got, param in zip(estimate_grads, params, strict=True):
        assert param.grad is not None
        assert torch.allclose(got, param.grad, rtol=1e-8, atol=1e-12)


def test_jacobian_frobenius_dense_matches_autograd() -> None:
    torch.manual_seed(14)
    spec = DenseModelSpec(hidden=(24,), latent_dim=5, activation="tanh", code_activation="sigmoid")
    model = DenseAutoencoder(spec, 64, "linear")
    x = torch.randn(7, 64, generator=seeded(15))
    expected = torch.stack([j.pow(2).sum().sqrt() for j in per_sample_jacobians(model.encoder, x)])
    got = jacobian_frobenius(model.encoder, x)
    assert got.shape == (7,)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert bool((got > 0).all())


def test_jacobian_frobenius_conv_matches_autograd() -> None:
    torch.manual_seed(16)
    spec = ConvModelSpec(arch="conv", channels=(4, 6), kernel_size=3, stride=2, latent_dim=5,
                         activation="gelu")  # fmt: skip
    model = ConvAutoencoder(spec, (1, 8, 8), "linear")
    x = torch.rand(6, 64, generator=seeded(17))
    expected = torch.stack([j.pow(2).sum().sqrt() for j in per_sample_jacobians(model.encoder, x)])
    got = jacobian_frobenius(model.encoder, x)
    assert got.shape == (6,)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)
    # samples differ, so their norms do: a batch-summed norm would repeat one value
    assert float(got.max() - got.min()) > 0


def test_jacobian_frobenius_of_a_linear_encoder_is_the_weight_norm() -> None:
    model = dense_encoder(9, (), 4, "linear", "linear", seed=18).float()
    x = torch.randn(3, 9, generator=seeded(19))
    got = jacobian_frobenius(model.encoder, x)
    (linear,) = (m for m in model.encoder.children() if isinstance(m, nn.Linear))
    weight_norm = float(linear.weight.detach().norm())
    assert torch.allclose(got, torch.full((3,), weight_norm), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# corruption


def test_gaussian_noise_has_mean_zero_and_the_spec_std() -> None:
    spec = GaussianNoiseSpec(type="gaussian", std=0.3)
    x = torch.rand(400, 250, generator=seeded(20)) * 5.0
    noisy = corrupt(x, spec, seeded(21))
    assert noisy.shape == x.shape
    noise = (noisy - x).double()
    n = noise.numel()
    # 5 standard errors: sigma / sqrt(n) for the mean, sigma / sqrt(2 n) for the std
    assert abs(float(noise.mean())) < 5 * spec.std / math.sqrt(n)
    assert abs(float(noise.std()) - spec.std) < 5 * spec.std / math.sqrt(2 * n)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.8])
def test_masking_zeroes_about_the_fraction(fraction: float) -> None:
    spec = MaskingNoiseSpec(type="masking", fraction=fraction)
    x = torch.rand(300, 200, generator=seeded(22)) + 0.5  # no zeros
    noisy = corrupt(x, spec, seeded(23))
    zeroed = noisy == 0
    n = x.numel()
    observed = float(zeroed.float().mean())
    assert abs(observed - fraction) < 5 * math.sqrt(fraction * (1 - fraction) / n)
    assert torch.equal(noisy[~zeroed], x[~zeroed])  # the rest is untouched


@pytest.mark.parametrize("fraction", [0.1, 0.4])
def test_salt_and_pepper_sets_about_the_fraction_to_min_or_max(fraction: float) -> None:
    spec = SaltPepperNoiseSpec(type="salt_pepper", fraction=fraction)
    x = torch.rand(300, 200, generator=seeded(24)) * 3.0 - 1.0
    low, high = float(x.min()), float(x.max())
    noisy = corrupt(x, spec, seeded(25))
    changed = noisy != x
    n = x.numel()
    observed = float(changed.float().mean())
    assert abs(observed - fraction) < 5 * math.sqrt(fraction * (1 - fraction) / n)
    values = noisy[changed]
    is_low, is_high = values == low, values == high
    assert bool((is_low | is_high).all())
    count = values.numel()
    assert abs(float(is_high.float().mean()) - 0.5) < 5 * math.sqrt(0.25 / count)


@pytest.mark.parametrize(
    "spec",
    [
        GaussianNoiseSpec(type="gaussian", std=0.5),
        MaskingNoiseSpec(type="masking", fraction=0.3),
        SaltPepperNoiseSpec(type="salt_pepper", fraction=0.3),
    ],
)
def test_corrupt_is_reproducible_from_the_generator_seed(
    spec: GaussianNoiseSpec | MaskingNoiseSpec | SaltPepperNoiseSpec,
) -> None:
    x = torch.rand(40, 30, generator=seeded(26)) + 0.1
    before = x.clone()
    first = corrupt(x, spec, seeded(27))
    again = corrupt(x, spec, seeded(27))
    other = corrupt(x, spec, seeded(28))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, x)
    assert torch.equal(x, before)  # the clean batch is not modified in place


# ---------------------------------------------------------------------------------------------
# reconstruction


def test_bce_matches_torch_inside_the_unit_interval() -> None:
    generator = seeded(29)
    x_hat = torch.rand(32, 20, dtype=torch.float64, generator=generator) * 0.98 + 0.01
    x = torch.rand(32, 20, dtype=torch.float64, generator=generator) * 0.98 + 0.01
    got = reconstruction_loss(x_hat, x, "bce")
    expected = F.binary_cross_entropy(x_hat, x)
    assert float(got) == pytest.approx(float(expected), rel=1e-12)
    by_hand = -(x * torch.log(x_hat) + (1 - x) * torch.log(1 - x_hat)).mean()
    assert float(got) == pytest.approx(float(by_hand), rel=1e-12)


def test_bce_of_a_diverged_output_is_nan_not_an_error() -> None:
    x_hat = torch.full((4, 3), 0.5)
    x_hat[1, 2] = float("nan")  # what a diverged decoder outputs
    loss = reconstruction_loss(x_hat, torch.rand(4, 3), "bce")
    assert torch.isnan(loss)  # the train loop then fails the stage as diverged, once


def test_mse_matches_the_mean_squared_error() -> None:
    generator = seeded(30)
    x_hat = torch.randn(16, 12, dtype=torch.float64, generator=generator)
    x = torch.randn(16, 12, dtype=torch.float64, generator=generator)
    got = reconstruction_loss(x_hat, x, "mse")
    assert float(got) == pytest.approx(float(((x_hat - x) ** 2).mean()), rel=1e-12)
