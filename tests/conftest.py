"""Shared pytest fixtures: an isolated cache (the embedded `glyphs` set is built once per session)
and no data root from the environment."""
import pytest


@pytest.fixture(scope="session", autouse=True)
def bml_cache_dir(tmp_path_factory):
    """BML_CACHE_DIR points at a fresh session directory; BML_DATA_ROOT is unset."""
    path = tmp_path_factory.mktemp("bml_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BML_CACHE_DIR", str(path))
        patch.delenv("BML_DATA_ROOT", raising=False)
        yield path
