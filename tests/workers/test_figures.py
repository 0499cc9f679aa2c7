"""Pictures are bounded whatever the data's size, drawn without pyplot, and the same when drawn
from many threads at once."""

import ast
import io
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from matplotlib.figure import Figure

from workers.figures import (
    CURVE_INCHES,
    DPI,
    LABEL_INCHES,
    MAX_COLUMNS,
    MAX_ROWS,
    PANEL_INCHES,
    curves_figure,
    save_curves,
    save_latent,
    save_reconstructions,
    side_by_side,
)

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
MAX_WIDTH = round((LABEL_INCHES + PANEL_INCHES[0] * MAX_COLUMNS) * DPI)  # 1564 pixels
MAX_HEIGHT = round(PANEL_INCHES[1] * MAX_ROWS * DPI)  # 832 pixels


def png_of(draw: Callable[..., None], *args: object) -> bytes:
    buffer = io.BytesIO()
    draw(buffer, *args)
    return buffer.getvalue()


def pixels(png: bytes) -> tuple[int, int]:
    height, width, _ = matplotlib.image.imread(io.BytesIO(png)).shape
    return width, height


def finalize_rows(x: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The rows a denoising job's reconstructions.png has, all of them x here."""
    return [(label, x) for label in ("original", "corrupted", "from corrupted", "reconstructed")]


@pytest.mark.parametrize(
    ("shape", "input_shape"),
    [
        ((50, 65536), (65536,)),  # the hostile upload: one bar per value would be 3M bars
        ((50, 64), (64,)),  # bars
        ((50, 3), (3,)),  # swiss roll
        ((12, 1024 * 1024), (1, 1024, 1024)),  # the largest image an upload may have
        ((12, 3 * 64 * 48), (3, 64, 48)),
    ],
    ids=["65536-vectors", "64-vectors", "3-vectors", "1024x1024-images", "rgb-images"],
)
def test_reconstructions_of_any_shape_have_bounded_pixels_and_bytes(
    shape: tuple[int, int], input_shape: tuple[int, ...]
) -> None:
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    png = png_of(save_reconstructions, finalize_rows(x), input_shape)
    width, height = pixels(png)
    assert width <= MAX_WIDTH and height <= 4 * PANEL_INCHES[1] * DPI + 1
    assert len(png) < 1_000_000, len(png)  # noise compresses worst: 650 kB for rgb-images


def test_rows_and_columns_past_the_limits_are_not_drawn() -> None:
    x = np.random.default_rng(0).random((64, 65536), dtype=np.float32)
    png = png_of(save_reconstructions, [("row", x)] * (MAX_ROWS + 4), (65536,))
    assert pixels(png) == (MAX_WIDTH, MAX_HEIGHT)
    assert len(png) < 1_000_000, len(png)


@pytest.mark.parametrize("codes_shape", [(50, 65536), (200_000, 16), (50, 2)])
def test_the_latent_picture_is_bounded_for_wide_and_long_codes(
    codes_shape: tuple[int, int],
) -> None:
    rng = np.random.default_rng(0)
    codes = rng.standard_normal(codes_shape, dtype=np.float32)
    labels = rng.integers(0, 10, codes_shape[0])
    png = png_of(save_latent, codes, labels)
    assert pixels(png) == (5 * DPI, round(4.5 * DPI))
    assert len(png) < 200_000, len(png)


def test_a_row_of_images_is_one_picture_with_each_image_in_its_column() -> None:
    images = np.random.default_rng(2).random((3, 4, 5), dtype=np.float32)
    row = side_by_side(images, columns=5)
    assert row.shape == (4, 5 * 6 - 1)
    for k in range(3):
        np.testing.assert_array_equal(row[:, 6 * k : 6 * k + 5], images[k])
    assert (row[:, 5::6] == 1.0).all()  # a white line between columns
    assert (row[:, 18:] == 1.0).all()  # columns without an image are white


def test_pictures_drawn_in_threads_are_the_pictures_drawn_one_by_one() -> None:
    rng = np.random.default_rng(1)
    inputs = [rng.random((10, 64), dtype=np.float32) for _ in range(8)]
    alone = [png_of(save_reconstructions, finalize_rows(x), (1, 8, 8)) for x in inputs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(
            lambda x: png_of(save_reconstructions, finalize_rows(x), (1, 8, 8)), inputs
        ))  # fmt: skip
    assert together == alone


def pyplot_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("matplotlib.pyplot")]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names]
            found += [n for n in [node.module, *names] if n.startswith("matplotlib.pyplot")]
    return [f"{path.relative_to(ROOT)}: {name}" for name in found]


def test_no_module_of_the_service_or_the_workers_imports_pyplot() -> None:
    files = sorted([*(ROOT / "workers").rglob("*.py"), *(ROOT / "service").rglob("*.py")])
    assert len(files) > 20
    assert [hit for path in files for hit in pyplot_imports(path)] == []
    # And at run time: drawing every picture loads no pyplot (whose state threads would share).
    code = (
        "import sys, io, numpy as np\n"
        "from workers.figures import save_curves, save_latent, save_reconstructions\n"
        "save_reconstructions(io.BytesIO(), [('x', np.zeros((3, 80)))], (80,))\n"
        "save_latent(io.BytesIO(), np.zeros((9, 3)), None)\n"
        "save_curves(io.BytesIO(), [{'stage': 's', 'epoch': 0, 'train_loss': 1.0}])\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def epochs_of(
    stage: str, count: int, decay: float = 2.0, **series: float
) -> list[dict[str, object]]:
    """A stage's metrics history as the store returns it: each series / decay every epoch."""
    return [
        {"stage": stage, "epoch": e, "token": 1, **{k: v / decay**e for k, v in series.items()},
         "epoch_seconds": 0.04, "samples_per_s": 36000.0}
        for e in range(count)
    ]  # fmt: skip


def drawn_lines(fig: Figure) -> dict[str, list[tuple[str, int]]]:
    """Panel title -> (label, points) of every line on it and on its twin (accuracy) axes."""
    # A twin has no title of its own: it has its panel's place.
    titles = {ax.get_position().bounds: ax.get_title() for ax in fig.axes if ax.get_title()}
    panels: dict[str, list[tuple[str, int]]] = {}
    for ax in fig.axes:
        lines = [
            (str(line.get_label()), len(np.asarray(line.get_xdata()))) for line in ax.get_lines()
        ]
        panels.setdefault(titles[ax.get_position().bounds], []).extend(lines)
    return panels


def test_curves_draw_one_line_per_series_for_every_stage_in_plan_order() -> None:
    history = [
        *epochs_of("layer2", 12, train_loss=0.5, val_mse=0.6),
        *epochs_of("layer1", 30, train_loss=0.4, val_mse=0.5),
        *epochs_of("head", 5, train_loss=2.0, val_accuracy=0.01),
    ]
    fig = curves_figure(history, ["layer1", "layer2", "finetune", "head"])
    assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["layer1", "layer2", "head"]
    assert drawn_lines(fig) == {
        "layer1": [("train_loss", 30), ("val_mse", 30)],
        "layer2": [("train_loss", 12), ("val_mse", 12)],
        "head": [("train_loss", 5), ("val_accuracy", 5)],  # accuracy on its own axis
    }
    layer1 = fig.axes[0]
    assert layer1.get_yscale() == "log"  # halving 30 times spans nine decades
    assert list(np.asarray(layer1.get_lines()[1].get_ydata())) == [0.5 / 2**e for e in range(30)]

    png = png_of(save_curves, history, ["layer1", "layer2", "finetune", "head"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = pixels(png)
    assert (width, height) == (round(3 * CURVE_INCHES[0] * DPI), round(CURVE_INCHES[1] * DPI))
    assert 5_000 < len(png) < 300_000, len(png)


def test_curves_of_one_flat_stage_are_linear_and_gaps_stay_gaps() -> None:
    history = epochs_of("train", 3, train_loss=0.1, val_mse=0.1)
    history[1]["val_mse"] = None  # a metric that was not finite reads back as None
    fig = curves_figure(history, ["train"])
    (ax,) = fig.axes
    assert ax.get_yscale() == "linear"  # 0.1 to 0.025: less than a decade
    assert np.isnan(np.asarray(ax.get_lines()[1].get_ydata())[1])
    one_panel = (round(CURVE_INCHES[0] * DPI), round(CURVE_INCHES[1] * DPI))
    assert pixels(png_of(save_curves, history, ["train"])) == one_panel


def test_curves_of_the_most_stages_and_epochs_are_bounded() -> None:
    stages = [f"pretrain-layer{i}" for i in range(1, 9)] + ["pretrain-finetune", "head",
                                                            "baseline"]  # fmt: skip
    history = [row for s in stages for row in epochs_of(s, 2000, 1.001, train_loss=1, val_mse=1)]
    png = png_of(save_curves, history, stages)
    assert pixels(png) == (round(3 * CURVE_INCHES[0] * DPI), round(4 * CURVE_INCHES[1] * DPI))
    assert len(png) < 1_000_000, len(png)
