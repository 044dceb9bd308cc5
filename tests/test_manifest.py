"""Manifest validation: every malformed field is named before anything is mapped."""

from __future__ import annotations

import copy
import json
import re

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
    with pytest.raises(ManifestError, match=re.escape(message)):
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


# ---- hostile manifests: strict types, 64-bit bounds, trainable strides, limits (issue 9, item 2) ----------


@pytest.mark.parametrize("version", [True, 1.0, "1", None])
def test_format_version_is_an_int_not_a_bool_or_float(manifest: Manifest, version) -> None:
    with pytest.raises(ManifestError, match=r"manifest\.format_version: expected int"):
        Manifest.from_json(_mutate(manifest, lambda d: d.update(format_version=version)))


@pytest.mark.parametrize(
    ("mutation", "field"),
    [
        (lambda d: d["tensors"][3].update(shape=[2**64], nbytes=2**66), "shape[0]"),
        (lambda d: d["tensors"][0].update(stride=[2**63, 1]), "stride[0]"),
        (lambda d: d["tensors"][0].update(storage_offset=2**70), "storage_offset"),
        (lambda d: d["tensors"][0].update(nbytes=2**63), "nbytes"),
        (lambda d: d["storages"][0].update(nbytes=2**64), "shm.nbytes"),
        (lambda d: d["storages"][0].update(fd=2**80), "shm.fd"),
        (lambda d: d.update(weight_version=2**63), "weight_version"),
        (lambda d: d["producer"].update(pid=2**64), "producer.pid"),
    ],
)
def test_ints_beyond_64_bits_are_refused_naming_the_field(manifest: Manifest, mutation, field: str) -> None:
    with pytest.raises(ManifestError, match=re.escape(field) + r".*must be an int64"):
        Manifest.from_json(_mutate(manifest, mutation))


@pytest.mark.parametrize(
    ("shape", "stride", "message"),
    [
        ([6, 4], [4, 0], r"stride\[1\]: 0 on a dimension of size 4"),  # an expanded tensor
        ([6, 4], [0, 1], r"stride\[0\]: 0 on a dimension of size 6"),
        ([6, 4], [1, 1], r"stride\[0\]: 1 overlaps"),  # rows that alias each other
        ([6, 4], [2, 1], r"stride\[0\]: 2 overlaps"),
    ],
)
def test_zero_and_overlapping_strides_are_refused(manifest: Manifest, shape, stride, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        Manifest.from_json(_mutate(manifest, lambda d: d["tensors"][0].update(shape=shape, stride=stride)))


def test_views_torch_makes_are_not_overlapping() -> None:
    base = torch.zeros(6, 4)
    m = ipcbridge.export({"base": base, "t": base.t(), "col": base[:, 1], "rows": base[2:4], "one": base[0:1, 0:1]})
    assert Manifest.from_json(m.to_json()) == m
    with pytest.raises(ManifestError, match="expanded tensor"):
        ipcbridge.export({"e": torch.zeros(1, 4).expand(3, 4)})


def test_a_manifest_without_tensors_is_a_manifest_error(manifest: Manifest) -> None:
    def empty(d) -> None:
        d["tensors"] = []
        d["storages"] = []

    with pytest.raises(ManifestError, match=r"manifest\.tensors: empty"):
        Manifest.from_json(_mutate(manifest, empty))
    with pytest.raises(ManifestError, match=r"manifest\.tensors: empty"):
        manifest.replace(tensors=())


def test_a_storage_no_tensor_uses_is_refused(manifest: Manifest) -> None:
    def extra(d) -> None:
        d["storages"].append(dict(d["storages"][0]))

    with pytest.raises(ManifestError, match=r"manifest\.storages\[2\]: no tensor views it"):
        Manifest.from_json(_mutate(manifest, extra))


@pytest.mark.parametrize("depth", [65, 1000, 100_000])
def test_deeply_nested_json_is_a_manifest_error_not_a_recursion_error(manifest: Manifest, depth: int) -> None:
    from ipcbridge.wire import MAX_JSON_DEPTH

    nested = "[" * depth + "]" * depth
    text = manifest.to_json().replace('"config":{', '"config":{"x":' + nested + ",", 1)
    with pytest.raises(ManifestError, match=rf"manifest: JSON nested deeper than {MAX_JSON_DEPTH} levels"):
        Manifest.from_json(text)
    with pytest.raises(ManifestError, match="nested deeper"):
        Manifest.from_json("[" * depth)


def test_depth_counts_structure_not_brackets_in_strings(manifest: Manifest) -> None:
    text = manifest.to_json().replace('"config":{', '"config":{"x":"' + "[{" * 500 + '\\"]",', 1)
    assert Manifest.from_json(text).config["x"].startswith("[{")  # 1000 brackets, all inside one string
    deep = manifest.to_json().replace('"config":{', '"config":{"x":' + "[" * 65 + "]" * 65 + ",", 1)
    with pytest.raises(ManifestError, match="nested deeper than 64 levels"):
        Manifest.from_json(deep)


def test_oversized_json_is_refused_before_parsing() -> None:
    from ipcbridge.manifest import MAX_MANIFEST_BYTES

    with pytest.raises(ManifestError, match=rf"more than the limit of {MAX_MANIFEST_BYTES}"):
        Manifest.from_json(" " * (MAX_MANIFEST_BYTES + 1))


def test_producer_start_time_round_trips_and_is_optional(manifest: Manifest) -> None:
    assert manifest.producer.start_time > 0  # read from /proc/self/stat
    older = _mutate(manifest, lambda d: d["producer"].pop("start_time"))
    assert Manifest.from_json(older).producer.start_time == 0
