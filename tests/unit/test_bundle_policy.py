"""The bundle trust policy (segq.pipeline.policy) and the trace codec, as pure functions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segq.pipeline import policy, trace
from segq.pipeline.policy import PolicyError

CONFIG = {
    "imports": ["$import os", "$os.system('echo pwned')"],
    "image_key": "image",
    "device": "$torch.device('cuda:0')",
    "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                    "channels": [4, 8], "strides": [2], "dropout": "$0.1"},
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "@image_key"},
        {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": -57, "a_max": 164, "b_min": 0,
         "b_max": 1, "clip": True, "dtype": "$numpy.float32"},
    ]},
    "postprocessing": {"_target_": "Compose", "transforms": [{"_target_": "AsDiscreted", "keys": "pred",
                                                              "argmax": True}]},
    "evaluator": {"_target_": "my_package.Evil", "x": "$__import__('os').system('rm -rf /')"},
}


def test_only_reached_items_are_kept_and_unreached_code_never_parsed() -> None:
    kept = policy.reachable(CONFIG, ["network_def", "preprocessing", "postprocessing"], trusted=False)
    assert set(kept) == {"network_def", "preprocessing", "postprocessing", "image_key"}
    assert "imports" not in kept and "evaluator" not in kept and "device" not in kept


@pytest.mark.parametrize(("patch", "key", "what"), [
    ({"network_def": {"_target_": "my_package.Net"}}, "network_def#_target_", "not a MONAI or torch.nn"),
    ({"network_def": {"_target_": "run", "config_file": "x.json"}}, "network_def#_target_", "not a MONAI"),
    ({"network_def": {"_target_": "monai.apps.download_url", "url": "http://x"}}, "network_def#_target_",
     "not a MONAI"),
    ({"preprocessing": {"_target_": "Compose", "transforms": [{"_target_": "SaveImaged", "keys": "image"}]}},
     "preprocessing#transforms#0#_target_", "not a MONAI"),
    ({"preprocessing": {"_target_": "Compose", "transforms": [{"_target_": "Lambdad", "keys": "image",
                                                                "func": "$lambda x: x * 2"}]}},
     "preprocessing#transforms#0#func", "is Python code"),
    ({"network_def": "$__import__('os').getcwd()"}, "network_def", "is Python code"),
    ({"network_def": {"_target_": "UNet", "in_channels": "@device"}, "device": "$os.getcwd()"}, "device",
     "is Python code"),
    ({"network_def": {"_target_": "UNet", "_requires_": "@device"}}, "network_def#_requires_", "runs other"),
    ({"network_def": "%other.json#net"}, "network_def", "macro"),
    ({"network_def": {"_target_": "UNet", "_mode_": "debug"}}, "network_def#_mode_", "debugger"),
])
def test_refusals_name_the_key(patch: dict[str, object], key: str, what: str) -> None:
    config = {**CONFIG, **patch}
    with pytest.raises(PolicyError) as caught:
        policy.reachable(config, ["network_def", "preprocessing"], trusted=False)
    message = str(caught.value)
    assert repr(key) in message and what in message and "--trust-model" in message


def test_trusted_keeps_references_without_checking() -> None:
    config = {**CONFIG, "network_def": {"_target_": "UNet", "in_channels": "@evaluator"}}
    kept = policy.reachable(config, ["network_def"], trusted=True)
    assert kept["evaluator"] == CONFIG["evaluator"]


def test_a_reference_into_an_item_keeps_only_that_part() -> None:
    config = {"shown": {"sw": 4, "evil": "$__import__('os')"}, "inferer": {"sw_batch_size": "@shown#sw"}}
    kept = policy.reachable(config, ["inferer#sw_batch_size"], trusted=False)
    assert kept == {"inferer": {"sw_batch_size": "@shown#sw"}, "shown": {"sw": 4}}


@pytest.mark.parametrize(("target", "allowed"), [
    ("UNet", True), ("SegResNet", True), ("monai.networks.nets.SwinUNETR", True), ("Compose", True),
    ("Spacingd", True), ("SlidingWindowInferer", True), ("torch.nn.Identity", True), ("run", False),
    ("os.system", False), ("monai.bundle.scripts.run", False), ("SaveImage", False), ("NoSuchThing", False),
])
def test_targets(target: str, allowed: bool) -> None:
    assert policy.allowed_target(target) is allowed


@pytest.mark.parametrize(("text", "allowed"), [
    ("$numpy.float32", True), ("$torch.float16", True), ("$[1, 2, 3]", True), ("$0.5", True),
    ("$np.uint8", True), ("$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')", True),
    ("$[1.5, 1.5, 1.5] if @displayable_configs#highres else [3.0, 3.0, 3.0]", True),
    ("$@preprocessing_transforms + @deepedit_transforms", True), ("$@x[0]", True),
    ("$lambda x: x", False), ("$open('/etc/passwd')", False), ("$__import__('os').system('id')", False),
    ("$import os", False), ("$torch.load('x.pt')", False), ("$(1).__class__", False), ("$10 ** 10 ** 10", False),
    ("$@network_def.to(@device)", False), ("$[x for x in ()]", False),
])
def test_expressions(text: str, allowed: bool) -> None:
    assert policy.allowed_expression(text) is allowed


def test_trace_round_trips_tensors_tuples_and_dtypes() -> None:
    value = {"affine": torch.tensor([[1.5, 0.0], [0.0, 2.0]], dtype=torch.float64), "size": (3, 4, 5),
             "pixdim": np.array([1.0, 0.8], dtype=np.float32), "dtype": torch.float32, "np": np.float32,
             "nested": [{"k": np.int64(3)}], "none": None}
    back = trace.decode(trace.encode(value))
    assert back["affine"].dtype == torch.float64 and torch.equal(back["affine"], value["affine"])
    assert back["size"] == (3, 4, 5) and back["pixdim"].dtype == np.float32
    assert back["dtype"] is torch.float32 and back["np"] is np.float32 and back["nested"] == [{"k": 3}]


def test_trace_refuses_what_it_cannot_record() -> None:
    with pytest.raises(TypeError, match="cannot record"):
        trace.encode({"f": object()})
