"""`model`: the dense and conv model specs, their sizes and the parameter limit."""

import math
from typing import Annotated, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, model_validator
from typing_extensions import TypeAliasType

from shared.specs.base import FrozenSpec

MAX_PARAMETERS = 50_000_000

# A named type: OpenAPI documents it once, and generated clients get one `Activation` enum.
Activation = TypeAliasType("Activation", Literal["relu", "sigmoid", "tanh", "gelu", "linear"])
HIDDEN_ACTIVATION_DEFAULT: Activation = "relu"
Width = Annotated[int, Field(ge=1, le=8192)]


CODE_ACTIVATION_DESCRIPTION = (
    "activation of the code layer (sigmoid for codes in (0, 1), which kl sparsity needs)"
)


class DenseModelSpec(FrozenSpec):
    """`model` with `arch: dense` (the default): fully connected layers, mirrored."""

    arch: Literal["dense"] = Field(default="dense", description="dense, or conv (below)")
    hidden: tuple[Width, ...] = Field(
        default=(), max_length=8,
        description="sizes of the encoder's hidden layers, input side first; the decoder "
        "mirrors them. Empty: one layer from the input to the code",
    )  # fmt: skip
    latent_dim: Width = Field(
        description="size of the code: below the input size is undercomplete, above overcomplete"
    )
    activation: Activation = Field(
        default=HIDDEN_ACTIVATION_DEFAULT,
        description="activation of the hidden layers (encoder and decoder); linear throughout "
        "is the PCA-equivalent autoencoder. With no hidden layers there is none to apply it to",
    )
    code_activation: Activation = Field(default="linear", description=CODE_ACTIVATION_DESCRIPTION)
    tied: bool = Field(default=False, description="decoder weights are the encoder's, transposed")

    @model_validator(mode="before")
    @classmethod
    def _no_conv_fields(cls, data: object) -> object:
        return refuse_other_arch(data, cls, ConvModelSpec, "conv")

    @property
    def is_one_sigmoid_layer(self) -> bool:
        """Input to sigmoid code in one layer: its contraction has an exact closed form."""
        return not self.hidden and self.code_activation == "sigmoid"

    def parameter_count(self, input_dim: int) -> int:
        sizes = [input_dim, *self.hidden, self.latent_dim]
        weights = sum(a * b for a, b in zip(sizes, sizes[1:], strict=False))
        biases = sum(sizes[1:]) + sum(sizes[:-1])
        return biases + weights * (1 if self.tied else 2)


class ConvModelSpec(FrozenSpec):
    """`model` with `arch: conv`, for image datasets: convolutions, mirrored by transposed ones
    whose output padding is computed so that the output shape equals the input shape."""

    arch: Literal["conv"] = Field(description="conv: needs image-shaped data (C, H, W)")
    channels: tuple[Annotated[int, Field(ge=1, le=1024)], ...] = Field(
        default=(16, 32), min_length=1, max_length=6,
        description="output channels of each conv layer, input side first",
    )  # fmt: skip
    kernel_size: int = Field(
        default=3, ge=1, le=11, description="square kernel of every layer; padding kernel_size // 2"
    )
    stride: int = Field(default=2, ge=1, le=4, description="stride of every layer")
    latent_dim: Width = Field(description="size of the code, a linear layer after the convs")
    activation: Activation = Field(
        default="relu", description="activation after every conv and transposed conv"
    )
    code_activation: Activation = Field(default="linear", description=CODE_ACTIVATION_DESCRIPTION)

    @model_validator(mode="before")
    @classmethod
    def _no_dense_fields(cls, data: object) -> object:
        return refuse_other_arch(data, cls, DenseModelSpec, "dense")

    @property
    def padding(self) -> int:
        return self.kernel_size // 2

    def feature_shapes(self, input_shape: tuple[int, ...]) -> list[tuple[int, int, int]]:
        """(C, H, W) after each conv layer, input first; ValueError if a shape cannot work.

        With padding k // 2 every size n >= 1 maps to an n2 >= 1 from which a transposed
        convolution gets back to n with an output padding in [0, stride): the decoder can
        always mirror the encoder exactly (models.ConvAutoencoder computes that padding).
        """
        if len(input_shape) != 3:
            raise ValueError(
                f"model.arch: conv needs image-shaped data (C, H, W); this dataset is {input_shape}"
            )
        shapes = [(input_shape[0], input_shape[1], input_shape[2])]
        for channels in self.channels:
            _, h, w = shapes[-1]
            h2, w2 = (conv_out(n, self.kernel_size, self.stride, self.padding) for n in (h, w))
            shapes.append((channels, h2, w2))
        return shapes

    def parameter_count(self, input_shape: tuple[int, ...]) -> int:
        shapes = self.feature_shapes(input_shape)
        k2 = self.kernel_size**2
        # per layer: a conv (c_in*c_out*k^2 weights, c_out biases) and its mirror (c_in biases)
        convs = sum(
            2 * a[0] * b[0] * k2 + b[0] + a[0] for a, b in zip(shapes, shapes[1:], strict=False)
        )
        flat = math.prod(shapes[-1])
        return convs + 2 * flat * self.latent_dim + flat + self.latent_dim


def refuse_other_arch(
    data: object, own: type[BaseModel], other: type[BaseModel], other_arch: str
) -> object:
    """Names a field of the other architecture as such: `arch` defaults to dense, so
    `channels` without `arch: conv` would otherwise read as a mere unknown key."""
    if isinstance(data, dict):
        foreign = sorted(set(data) & (set(other.model_fields) - set(own.model_fields)))
        if foreign:
            raise ValueError(
                f"{foreign[0]}: a field of {other_arch} models, and this model is arch: "
                f"{data.get('arch', 'dense')}; set arch: {other_arch}, or leave {foreign[0]} out"
            )
    return data


def conv_out(n: int, kernel: int, stride: int, padding: int) -> int:
    return (n + 2 * padding - kernel) // stride + 1


def transposed_out(n: int, kernel: int, stride: int, padding: int) -> int:
    """Size out of a ConvTranspose2d without output padding."""
    return (n - 1) * stride - 2 * padding + kernel


def _arch(model: object) -> str:
    """The `arch` tag of a model spec; dense when left out."""
    if isinstance(model, dict):
        return str(model.get("arch", "dense"))
    return str(getattr(model, "arch", "dense"))


ModelSpec = Annotated[
    Annotated[DenseModelSpec, Tag("dense")] | Annotated[ConvModelSpec, Tag("conv")],
    Discriminator(_arch),
]
