"""The contract with torch's private APIs (Note [private torch APIs] in ipcbridge/_torch.py).

Fails loudly when a torch release drops or reshapes one, before anything subtler breaks.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from ipcbridge import BridgeError, _torch

PRIVATE = [
    (torch.UntypedStorage, "_share_cuda_"),
    (torch.UntypedStorage, "_new_shared_cuda"),
    (torch.UntypedStorage, "_share_fd_cpu_"),
    (torch.cuda, "_lazy_init"),
]


@pytest.mark.parametrize(("owner", "name"), PRIVATE, ids=[n for _, n in PRIVATE])
def test_every_private_api_still_exists(owner, name) -> None:
    assert callable(getattr(owner, name, None)), f"torch {torch.__version__} has no {owner.__name__}.{name}"


def test_storage_identity_survives_moving_into_shared_memory() -> None:
    t = torch.randn(4, 4)
    st = t.untyped_storage()
    key, ptr = _torch.storage_key(st), st.data_ptr()
    st.share_memory_()
    assert st.data_ptr() != ptr  # the bytes moved to /dev/shm...
    assert _torch.storage_key(t[1:].untyped_storage()) == key  # ...the identity did not


def test_share_fd_cpu_gives_an_fd_and_the_size() -> None:
    st = torch.zeros(10, dtype=torch.float32).untyped_storage()
    st.share_memory_()
    fd, nbytes = _torch.share_fd_cpu(st)
    assert fd >= 0 and nbytes == 40


def test_module_buffers_are_the_live_dict() -> None:
    norm = nn.BatchNorm1d(3)
    buffers = _torch.module_buffers(norm)
    buffers["running_mean"] = torch.ones(3)
    assert torch.equal(norm.running_mean, torch.ones(3))


class _Reshaped:
    """A storage whose private export changed shape, as a future torch might."""

    def _share_cuda_(self):
        return (0, b"handle", 16)

    def _share_fd_cpu_(self):
        return (3, 40, "new field")


def test_a_changed_tuple_names_the_torch_version() -> None:
    with pytest.raises(BridgeError, match=rf"3 items where ipcbridge expects 8: torch {re.escape(torch.__version__)}"):
        _torch.share_cuda(_Reshaped())
    with pytest.raises(BridgeError, match=r"_share_fd_cpu_\(\) returned 3 items where ipcbridge expects 2"):
        _torch.share_fd_cpu(_Reshaped())
    with pytest.raises(BridgeError, match="expects 8"):
        _torch.open_shared_cuda((0, b"h"))


def test_version_counter_contract() -> None:
    base = torch.zeros(8)
    p = torch.nn.Parameter(base[:4])
    v = _torch.tensor_version(p)
    with torch.no_grad():
        p.add_(1)
    assert _torch.tensor_version(p) == v + 1
    p.data.add_(1)  # .data has a counter of its own: invisible, as the Note says
    assert _torch.tensor_version(p) == v + 1
    base[6] = 1.0  # a write anywhere in the viewed tensor moves the shared counter
    assert _torch.tensor_version(p) == v + 2


# ---- precision ------------------------------------------------------------------------------------------
