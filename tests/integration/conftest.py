"""One real TorchServe for the whole integration session (starting one costs ~30 s on 2 cores).

The archive is built with the real `tta archive` command: tiny-random CLIP, a small label file,
batchSize 4 with a 200 ms batch window (so concurrent requests share a batch), small request
limits so the limit checks are cheap to trigger.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.kserve_server import KServe
from tests.integration.torchserve import TorchServe, build_archive

MODEL = "cliptest"
LABELS = ("cat", "dog", "astronaut", "coffee cup", "rocket", "car", "tree", "house", "bird", "fish")
MAX_LABELS = 20
MAX_PIXELS = 2_000_000
KSERVE_METHOD_DEFAULTS = '{"tpt": {"n_views": 8}, "zero": {"n_views": 8}}'
# The same deployment as the session TorchServe, served by `tta serve --server kserve`.
KSERVE_ARGS = ("--method-defaults", KSERVE_METHOD_DEFAULTS, "--max-labels", str(MAX_LABELS), "--max-image-pixels",
               str(MAX_PIXELS), "--batch-size", "4", "--max-batch-delay", "200")


def jpeg_bytes(name: str, quality: int = 90) -> bytes:
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(getattr(data, name)()).convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    """scikit-image's sample photos as JPEG bytes."""
    return {name: jpeg_bytes(name) for name in ("chelsea", "astronaut", "coffee", "rocket", "camera")}


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("model_store")
    labels = store.parent / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    build_archive(
        store, MODEL, "--labels-file", str(labels), "--batch-size", "4", "--max-batch-delay", "200",
        "--workers", "1", "--max-labels", str(MAX_LABELS), "--max-image-pixels", str(MAX_PIXELS),
        "--method-defaults", '{"tpt": {"n_views": 8}, "zero": {"n_views": 8}}', "--onnx",
    )
    return store


@pytest.fixture(scope="session")
def server(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    with TorchServe(tmp_path_factory.mktemp("torchserve"), MODEL).running(model_store, f"{MODEL}.mar") as ts:
        yield ts


@pytest.fixture(scope="session")
def kserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KServe]:
    """One KServe model server for the session (tests/integration/test_kserve.py, test_oip_conformance.py)."""
    import importlib.util

    if importlib.util.find_spec("kserve") is None:
        pytest.skip("the kserve extra is not installed (uv sync --extra kserve)")
    workdir = tmp_path_factory.mktemp("kserve")
    labels = workdir / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    with KServe(workdir, MODEL).running(labels, *KSERVE_ARGS) as running:
        yield running
