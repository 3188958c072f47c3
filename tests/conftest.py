import pytest
import torch

# Shared test helpers get pytest's assertion messages too (before anything imports them).
pytest.register_assert_rewrite("_isa_harness", "_earned", "_bitmap_inputs")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def calib_batches():
    """Two small batches of built-in procedural image-caption pairs (64 px, padded text)."""
    from multiflow.data import BuiltinCalibrationSet, calibration_batches

    ds = BuiltinCalibrationSet(num_samples=8, image_size=64, seed=0)
    return calibration_batches(ds, batch_size=4, image_size=64)


@pytest.fixture(scope="session")
def blip_factory():
    from multiflow.models.blip import build_blip_tiny

    return lambda task="retrieval", seed=0: build_blip_tiny(task, seed=seed)
