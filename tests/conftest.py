"""Shared pytest fixtures: an isolated cache (the embedded `glyphs` set is built once per session),
no data root from the environment, and a simulated GPU."""
from types import SimpleNamespace

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def bml_cache_dir(tmp_path_factory):
    """BML_CACHE_DIR points at a fresh session directory; BML_DATA_ROOT is unset."""
    path = tmp_path_factory.mktemp("bml_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BML_CACHE_DIR", str(path))
        patch.delenv("BML_DATA_ROOT", raising=False)
        yield path


@pytest.fixture
def simulate_gpu(monkeypatch):
    """simulate_gpu(capability, arch_list=..., count=1, name=..., memory_gib=16): torch.cuda answers as on such a
    machine (its device properties too).

    `is_bf16_supported` answers True everywhere, as it does on a V100 through emulation, and making a GPU
    current (`set_device`) is recorded: a dry run must not do it.
    """
    selected = []

    def install(capability, arch_list=("sm_70", "sm_75", "sm_80", "sm_86", "sm_90"), count=1,
                name="Simulated GPU", memory_gib=16):
        properties = SimpleNamespace(name=name, major=capability[0], minor=capability[1],
                                     total_memory=memory_gib * 2**30)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: properties)
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(arch_list))
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
        monkeypatch.setattr(torch.cuda, "set_device", selected.append)
        return selected

    return install
