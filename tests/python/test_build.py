"""The built extension: CUDA flag, no link-time dependency on the CUDA driver, public names."""

from __future__ import annotations

import shutil
import subprocess

import pytest

import apportion as ap
from apportion import _core


def test_built_with_cuda_is_a_bool() -> None:
    assert isinstance(_core.built_with_cuda, bool)
    assert ap.built_with_cuda is _core.built_with_cuda


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) is not installed")
def test_extension_never_links_the_cuda_driver() -> None:
    # The GPU layer opens libcuda at run time, so the same wheel imports on machines without a
    # driver. Linking it (directly or through a shared cudart) would break that.
    out = subprocess.run(["readelf", "-d", _core.__file__], capture_output=True, text=True,
                         check=True).stdout
    needed = [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]
    assert needed, "readelf listed no dependencies at all"
    assert not [n for n in needed if n.startswith(("libcuda.", "libcudart."))], needed


def test_public_names_exist() -> None:
    for name in ap.__all__:
        assert hasattr(ap, name), name
    for err in ("QuotaError", "PlacementError", "QueueFull", "DeadlineExceeded", "RuntimeClosed",
                "ModelNotFound", "WorkerCrashed"):
        assert issubclass(getattr(ap, err), ap.ApportionError)
