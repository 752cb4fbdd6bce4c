"""Which device a processor works on, and how NVML names it."""

from __future__ import annotations

import os

import torch

from . import _core

__all__ = ["default_telemetry", "nvml_index_of_device"]


def default_telemetry(device: int | None = None) -> _core.Telemetry:
    """CUDA device ``device``'s NVML readings (default: the current one) when usable, host
    memory otherwise."""
    if device is None:
        device = torch.cuda.current_device() if torch.cuda.is_available() else -1
    return _core.Telemetry.auto(nvml_index_of_device(device), 0.05)


def nvml_index_of_device(device: int) -> int:
    """NVML numbers devices its own way (CUDA_VISIBLE_DEVICES and CUDA's fastest-first order
    do not apply), so the CUDA device is found by its PCI bus id; -1 without CUDA."""
    if device < 0 or not torch.cuda.is_available():
        return -1
    properties = torch.cuda.get_device_properties(device)
    bus = getattr(properties, "pci_bus_id", None)
    if bus is not None:
        bus_id = (
            f"{getattr(properties, 'pci_domain_id', 0):08X}:{bus:02X}:"
            f"{getattr(properties, 'pci_device_id', 0):02X}.0"
        )
        index = _core.nvml_index_of_pci_bus_id(bus_id)
        if index >= 0:
            return index
    # No bus id (an older torch or driver): the numbering agrees only when nothing remaps it.
    return device if "CUDA_VISIBLE_DEVICES" not in os.environ else -1
