import pytest

from qlora_helpers.common import assets


@pytest.fixture(scope="session")
def cached_assets():
    """The real assets must be in the cache (``make test`` fetches them first)."""
    for name in assets.ASSETS:
        assets.verify(name)
    return assets


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A 2-layer random Llama (hidden 64) saved with SmolLM2's tokenizer: a stand-in for SmolLM2 by path."""
    from qlora_helpers.common.models import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", family="llama")
