"""Manifest validation: every malformed field is named before anything is mapped."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import ipcbridge
from ipcbridge import ManifestError
from ipcbridge.manifest import Manifest


@pytest.fixture
def manifest() -> Manifest:
    fused = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    return ipcbridge.export({"fused": fused, "top": fused[:2], "col": fused[:, 1], "other": torch.ones(3)},
                            config={"model_type": "llama"})


def test_round_trip_is_plain_json(manifest: Manifest) -> None:
    text = manifest.to_json()
    assert "pickle" not in text
    again = Manifest.from_json(text)
    assert again == manifest
    assert again.to_json() == text


def test_views_of_one_storage_reference_it_once(manifest: Manifest) -> None:
    assert len(manifest.storages) == 2
    by_name = {t.name: t for t in manifest.tensors}
    assert by_name["fused"].storage == by_name["top"].storage == by_name["col"].storage
    assert by_name["col"].stride == (4,) and by_name["col"].storage_offset == 1


def _mutate(manifest: Manifest, fn) -> str:
    d = copy.deepcopy(manifest.to_dict())
    fn(d)
    return json.dumps(d)


@pytest.mark.parametrize(
    ("mutation", "message"),
    [
        (lambda d: d.update(format_version=99), "format_version: 99 is not supported"),
        (lambda d: d.update(format="something"), "not an ipcbridge manifest"),
        (lambda d: d["tensors"][0].update(dtype="bf16"), "unknown dtype 'bf16'"),
        (lambda d: d["tensors"][0].update(shape=[7, 4], nbytes=112), "past the end of storage"),
        (lambda d: d["tensors"][1].update(storage_offset=23), "past the end of storage"),
        (lambda d: d["tensors"][0].update(shape=[6, -4]), "shape[1]: must be >= 0"),
        (lambda d: d["tensors"][0].update(shape=[True, 4]), "got bool"),
        (lambda d: d["tensors"][0].update(stride=[4]), "differ in rank"),
        (lambda d: d["tensors"][0].update(nbytes=1), "nbytes: 1 != numel"),
        (lambda d: d["tensors"][0].update(storage=9), "only 2 storage(s)"),
        (lambda d: d["tensors"][1].update(name="fused"), "duplicate tensor name 'fused'"),
        (lambda d: d["tensors"][0].pop("stride"), "missing field(s) ['stride']"),
        (lambda d: d["tensors"][0].update(extra=1), "unknown field(s) ['extra']"),
        (lambda d: d["storages"][0].update(kind="rdma"), "unknown transport 'rdma'"),
        (lambda d: d["storages"][0].update(fd="3"), "expected int"),
        (lambda d: d.update(layout="fancy"), "unknown layout 'fancy'"),
        (lambda d: d["producer"].update(pid=0), "producer.pid: must be >= 1"),
        (lambda d: d.update(config=[1]), "manifest.config: expected Mapping"),
    ],
)
def test_bad_fields_are_named(manifest: Manifest, mutation, message: str) -> None:
    with pytest.raises(ManifestError, match=__import__("re").escape(message)):
        Manifest.from_json(_mutate(manifest, mutation))


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", "null", b"\xff\xfe"])
def test_malformed_json(text) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_json(text)


def test_manifest_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        Manifest.from_json("{")


def test_export_refuses_nothing_and_non_tensors() -> None:
    with pytest.raises(ManifestError, match="nothing to export"):
        ipcbridge.export({})
    with pytest.raises(TypeError, match="not"):
        ipcbridge.export({"a": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(ManifestError, match="cannot be shared"):
        ipcbridge.export({"a": torch.empty(2, device="meta")})
