import pytest

from qlora_helpers import assets


@pytest.fixture(scope="session")
def cached_assets():
    """The real assets must be in the cache (``make test`` fetches them first)."""
    for name in assets.ASSETS:
        assets.verify(name)
    return assets
