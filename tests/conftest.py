import pytest

from fleetwise.worker.model.files import write_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny preset, written once per test session."""
    return write_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)
