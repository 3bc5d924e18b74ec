"""Simulator of the vendor's WebSocket device-control program (see vendor-protocol.md)."""

from .device import SimDevice
from .png import make_png
from .server import (
    DEVIATIONS,
    FAILURE,
    LICENCE_MESSAGE,
    SUCCESS,
    Simulator,
    SimulatorConfig,
    run_simulator,
)

__all__ = [
    "DEVIATIONS",
    "FAILURE",
    "LICENCE_MESSAGE",
    "SUCCESS",
    "SimDevice",
    "Simulator",
    "SimulatorConfig",
    "make_png",
    "run_simulator",
]
