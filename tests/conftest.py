"""Shared fixtures: offline mode, the tiny models, real photos and the digits data.

Everything is built locally: no test downloads anything. The digits CLIP is trained once and
cached under $TTA_CACHE_DIR (default ~/.cache/clip-tta), so later runs only load it.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models run fastest on one thread, and one thread is immune to a busy machine's OpenMP
# barrier waits (measured 20-100x slowdowns with 2 threads on a loaded 2-core box).
# TTA_TEST_THREADS=2 reruns the suite with another thread count (the CI portability job and the
# flake hunt do): no assertion may depend on it.
TEST_THREADS = int(os.environ.get("TTA_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)

SAMPLE_PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")


@pytest.fixture(scope="session")
def tiny_clip():
    from tta.models import load_model

    return load_model("tiny-random")


@pytest.fixture(scope="session")
def sample_images() -> dict[str, torch.Tensor]:
    """Real photos shipped with scikit-image, as uint8 [3, H, W] tensors."""
    from skimage import data

    out = {}
    for name in SAMPLE_PHOTOS:
        array = getattr(data, name)()
        out[name] = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    return out


@pytest.fixture(scope="session")
def chelsea_jpeg(tmp_path_factory) -> Path:
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("photos") / "chelsea.jpg"
    Image.fromarray(data.chelsea()).save(path, quality=92)
    return path


@pytest.fixture(scope="session")
def digits_clip():
    from tta.testing.digits import load_digits_clip

    return load_digits_clip("base")


@pytest.fixture(scope="session")
def digits_data():
    """(train_images, train_labels, test_images, test_labels) of the fixed digits split."""
    from tta.testing.digits import digits_split

    return (*digits_split("train"), *digits_split("test"))
