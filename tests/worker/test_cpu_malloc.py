"""The CPU worker's malloc settings are accepted by glibc (where the machine has it)."""

from __future__ import annotations

import platform

import pytest

from engine.worker.cpu_malloc import tune_malloc


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt settings are glibc's")
def test_glibc_accepts_the_settings() -> None:
    assert tune_malloc() is True
