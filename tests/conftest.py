import pytest

from fleetwise.worker.model.files import write_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny preset, written once per test session."""
    return write_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory):
    """The small preset (tens of millions of parameters: its forward pass is mostly arithmetic,
    not Python), written once per test session."""
    return write_model(tmp_path_factory.mktemp("models") / "small", "small", seed=0)
