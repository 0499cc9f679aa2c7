"""The autoencoders: shapes through conv stacks, parameter counts, tied weights, and a linear
autoencoder that finds the PCA subspace."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from shared.specs import ConvModelSpec, DataSpec, DenseModelSpec
from workers.artifacts import pca_val_mse
from workers.data import build_datasets
from workers.models import ConvAutoencoder, DenseAutoencoder, TiedLinear

CHANNELS = (4, 3, 5, 2)

# ---------------------------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize("input_shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (1, 9, 13)])
@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_conv_autoencoder_maps_inputs_back_to_their_shape(
    input_shape: tuple[int, int, int], kernel_size: int, stride: int
) -> None:
    accepted = 0
    for layers in range(1, 5):
        spec = ConvModelSpec(arch="conv", channels=CHANNELS[:layers], kernel_size=kernel_size,
                             stride=stride, latent_dim=6)  # fmt: skip
        try:
            shapes = spec.feature_shapes(input_shape)
        except ValueError:
            continue
        accepted += 1
        torch.manual_seed(layers)
        model = ConvAutoencoder(spec, input_shape, "linear")
        x = torch.randn(3, math.prod(input_shape))
        x_hat, codes = model(x)
        context = f"{input_shape} kernel {kernel_size} stride {stride} layers {layers}"
        assert x_hat.shape == x.shape, context
        assert codes.shape == (3, 6), context
        # feature_shapes is what the encoder's convolutions really produce
        seen = []
        h = x.reshape(3, *input_shape)
        for module in model.encoder.children():
            if isinstance(module, nn.Conv2d):
                h = module(h)
                seen.append(tuple(h.shape[1:]))
        assert seen == shapes[1:], context
        assert shapes[0] == input_shape
    assert accepted > 0


def test_deep_stride_four_collapses_to_one_pixel_and_still_mirrors() -> None:
    """With padding kernel // 2 no layer shrinks a side below 1: six stride-4 layers on 8x8
    reach 1x1 and stay there, and the mirrored decoder still rebuilds 8x8."""
    spec = ConvModelSpec(arch="conv", channels=(2,) * 6, kernel_size=3, stride=4, latent_dim=3)
    shapes = spec.feature_shapes((1, 8, 8))
    assert shapes == [(1, 8, 8), (2, 2, 2)] + [(2, 1, 1)] * 5
    torch.manual_seed(0)
    model = ConvAutoencoder(spec, (1, 8, 8), "linear")
    x_hat, codes = model(torch.randn(2, 64))
    assert x_hat.shape == (2, 64)
    assert codes.shape == (2, 3)


@pytest.mark.parametrize("input_shape", [(3,), (64,), (8, 8), (1, 1, 8, 8)])
def test_feature_shapes_rejects_inputs_that_are_not_images(input_shape: tuple[int, ...]) -> None:
    spec = ConvModelSpec(arch="conv", channels=(4,), latent_dim=2)
    with pytest.raises(ValueError, match="image-shaped"):
        spec.feature_shapes(input_shape)


# ---------------------------------------------------------------------------------------------
# parameter counts


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("input_shape", "channels", "kernel_size", "stride"),
    [
        ((1, 8, 8), (4,), 3, 1),
        ((1, 8, 8), (16, 32), 3, 2),
        ((1, 28, 28), (8, 16, 4), 5, 2),
        ((3, 32, 32), (6, 12, 12, 6), 3, 3),
        ((1, 9, 13), (5, 7), 5, 3),
    ],
)
def test_conv_parameter_count_equals_the_built_model(
    input_shape: tuple[int, int, int], channels: tuple[int, ...], kernel_size: int, stride: int
) -> None:
    spec = ConvModelSpec(arch="conv", channels=channels, kernel_size=kernel_size, stride=stride,
                         latent_dim=7)  # fmt: skip
    model = ConvAutoencoder(spec, input_shape, "linear")
    assert spec.parameter_count(input_shape) == count(model)


@pytest.mark.parametrize("hidden", [(), (32,), (48, 16), (7, 9, 11)])
@pytest.mark.parametrize("tied", [False, True])
def test_dense_parameter_count_equals_the_built_model(hidden: tuple[int, ...], tied: bool) -> None:
    spec = DenseModelSpec(hidden=hidden, latent_dim=5, tied=tied)
    model = DenseAutoencoder(spec, 64, "linear")
    assert spec.parameter_count(64) == count(model)


# ---------------------------------------------------------------------------------------------
# tied weights


def test_tied_decoder_uses_the_encoder_weights() -> None:
    torch.manual_seed(1)
    spec = DenseModelSpec(hidden=(16,), latent_dim=4, activation="tanh", tied=True)
    model = DenseAutoencoder(spec, 10, "linear")
    encoder_linears = [m for m in model.encoder.children() if isinstance(m, nn.Linear)]
    decoder_tied = [m for m in model.decoder.children() if isinstance(m, TiedLinear)]
    assert len(decoder_tied) == 2
    assert not any(isinstance(m, nn.Linear) for m in model.decoder.children())
    for tied, linear in zip(decoder_tied, reversed(encoder_linears), strict=True):
        assert tied.encoder_layer.weight is linear.weight

    x = torch.randn(5, 10)
    h = torch.randn(5, 4)
    with torch.no_grad():
        decoded_before = model.decoder(h)
        encoded_before = model.encoder(x)
        # the decoder's first layer is the encoder's code layer, transposed
        code_layer = encoder_linears[-1]
        assert torch.allclose(decoder_tied[0](h), h @ code_layer.weight + decoder_tied[0].bias)

        code_layer.weight.mul_(2.0)  # change the encoder: the decoder's output moves
        decoded_after = model.decoder(h)
        assert not torch.allclose(decoded_before, decoded_after)

        decoder_tied[-1].encoder_layer.weight.add_(0.5)  # change the decoder: the encoder moves
        assert not torch.allclose(encoded_before, model.encoder(x))


def test_untied_decoder_is_independent_of_the_encoder() -> None:
    torch.manual_seed(2)
    model = DenseAutoencoder(DenseModelSpec(hidden=(16,), latent_dim=4), 10, "linear")
    h = torch.randn(5, 4)
    with torch.no_grad():
        before = model.decoder(h)
        for module in model.encoder.children():
            if isinstance(module, nn.Linear):
                module.weight.mul_(2.0)
        assert torch.equal(before, model.decoder(h))


# ---------------------------------------------------------------------------------------------
# a linear autoencoder is PCA


def test_linear_autoencoder_spans_the_pca_subspace() -> None:
    """Digits, k = 8, full-batch L-BFGS (1000 iterations, float64, torch seed 0).

    Measured: largest principal angle between the decoder's column space and the top-8
    principal directions 0.048 degrees (torch seeds 0-5 gave 0.03-0.09), validation MSE 1.00001
    times PCA's; asserted: angle < 1 degree, MSE within 2 %. About 2 s on an idle 2-core host.
    """
    k = 8
    split = build_datasets(DataSpec(dataset="digits"))
    x_train = torch.from_numpy(split.x_train).double()
    x_val = torch.from_numpy(split.x_val).double()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast and steadier on a busy host
    try:
        torch.manual_seed(0)
        spec = DenseModelSpec(latent_dim=k, activation="linear", code_activation="linear")
        model = DenseAutoencoder(spec, split.input_dim, "linear").double()
        optimizer = torch.optim.LBFGS(
            model.parameters(), lr=1.0, max_iter=1000, history_size=50,
            tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe",
        )  # fmt: skip

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            x_hat, _ = model(x_train)
            loss: torch.Tensor = ((x_hat - x_train) ** 2).mean()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            val_mse = float(((model(x_val)[0] - x_val) ** 2).mean())
    finally:
        torch.set_num_threads(threads)

    decoder = next(model.decoder.children())
    assert isinstance(decoder, nn.Linear)
    basis = decoder.weight.detach().numpy()  # (D, k)
    assert basis.shape == (split.input_dim, k)
    centered = split.x_train.astype(np.float64) - split.x_train.mean(axis=0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    angles = np.degrees(scipy.linalg.subspace_angles(basis, vt[:k].T))
    assert float(angles.max()) < 1.0, angles

    pca = pca_val_mse(split.x_train, split.x_val, k)
    assert abs(val_mse / pca - 1.0) < 0.02
