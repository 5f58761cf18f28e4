"""No exported TorchScript graph holds a frozen device.

``torch.jit.trace`` records every factory call (``torch.ones(.., device=x.device)``,
``torch.arange(n)``, ``torch.eye(n)``, ...) with the device it saw while tracing, as a
``prim::Constant[value="cpu"]`` feeding the op. Loaded on a GPU with ``map_location``, the weights
move but such a constant does not: the first op mixing it with a CUDA tensor fails, warm-up fails
and the service never becomes ready. So every graph that serving loads is walked (submodules
inlined, nested blocks included) for a constant of Device type or a device-like string.
"""
from __future__ import annotations

import re
import warnings

import pytest
import torch

DEVICE_STRING = re.compile(r"^(cpu|cuda|mps|xpu|meta|hip)(:\d+)?$")


def _constant_device(node: torch._C.Node) -> str | None:
    """The device a prim::Constant freezes, if it is one (a Device, or a string that names one)."""
    if node.kind() != "prim::Constant" or not node.hasAttribute("value"):
        return None
    kind = node.output().type().kind()
    if kind == "DeviceObjType":
        return str(node.output().toIValue())
    if kind == "StringType" and DEVICE_STRING.match(node.s("value")):
        return node.s("value")
    return None


def frozen_devices(graph: torch._C.Graph) -> list[str]:
    """One line per op fed by a device constant: '<op> <- device "<dev>" at <source>'."""
    found = []

    def walk(block) -> None:
        for node in block.nodes():
            device = _constant_device(node)
            if device is not None:
                users = [use.user for use in node.output().uses()] or [node]
                for user in users:
                    where = user.sourceRange().strip().splitlines()[0] if user.sourceRange().strip() else "?"
                    found.append(f"{user.kind()} <- device {device!r} at {where}")
            for sub in node.blocks():
                walk(sub)

    walk(graph)
    return found


def _trace(module: torch.nn.Module, *inputs) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(module, inputs, check_trace=False)


class _FrozenDevice(torch.nn.Module):
    def forward(self, mask):
        ones = torch.ones(mask.shape[0], 1, dtype=torch.bool, device=mask.device)
        return torch.cat([ones, mask], dim=1)


class _DeviceFree(torch.nn.Module):
    def forward(self, mask):
        return torch.cat([mask.new_ones((mask.shape[0], 1)), mask], dim=1)


def test_the_check_names_a_frozen_device_and_passes_device_free_code():
    mask = torch.ones(2, 3, dtype=torch.bool)
    found = frozen_devices(_trace(_FrozenDevice(), mask).inlined_graph)
    assert found and found[0].startswith("aten::ones <- device 'cpu'"), found
    assert "test_exported_graphs.py" in found[0]
    assert frozen_devices(_trace(_DeviceFree(), mask).inlined_graph) == []
    # the check descends into nested blocks (scripted control flow)

    @torch.jit.script
    def branchy(x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x + torch.ones(1, device="cpu")
        return x

    assert any(line.startswith("aten::ones") for line in frozen_devices(branchy.graph))


@pytest.mark.parametrize("name", ["iat", "sif", "source"])
def test_exported_torchscript_graph_has_no_frozen_device(serving_run, name):
    """model.pt as `iat export` writes it for every serving module."""
    version_dir = serving_run[3][name]
    module = torch.jit.load(str(version_dir / "model.pt"), map_location="cpu")
    found = frozen_devices(module.inlined_graph)
    assert not found, f"{name}/model.pt freezes a device into {len(found)} op(s):\n  " + "\n  ".join(found)
