"""Power measurement for the measuring scheduler: energy meters, and the estimate when there is none.

Owns the `PowerMeter` interface (a cumulative energy counter in joules) and its backends:
`zeus-apple-silicon` (macOS SoC: CPU, GPU, DRAM, ANE), `nvml` (NVIDIA GPUs, summed) and `rapl`
(Linux powercap packages). `detect_meter_with_reasons` picks the first backend that works and says
why each earlier one did not, so callers can print "fell back to the estimate because ...".
`measure_idle_and_busy` turns a meter into a `PowerProfile`; `estimated_profile` makes one from
catalogue or cluster.yaml watts. Basis strings: `measured (<meter name>)`, `estimated (<basis>)`.

Optional packages (zeus_apple_silicon, pynvml) are imported lazily inside their backends: a missing
package only makes that backend unavailable. No MLX here.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from pomona.profiles import PowerProfile

__all__ = [
    "EnergyWindow",
    "NvmlMeter",
    "PowerMeter",
    "RaplMeter",
    "ZeusAppleSiliconMeter",
    "detect_meter",
    "detect_meter_with_reasons",
    "estimated_power",
    "estimated_profile",
    "measure_idle_and_busy",
    "measure_window",
    "measured_basis",
]

T = TypeVar("T")

RAPL_ROOT = Path("/sys/class/powercap")
# Top-level zones only ("intel-rapl:0"); sub-zones ("intel-rapl:0:0", core/dram) are inside them.
_TOP_LEVEL_ZONE = re.compile(r"^intel-rapl:\d+$")


class PowerMeter(ABC):
    """A cumulative energy counter. Only differences between two reads mean anything."""

    name: str = "meter"

    @abstractmethod
    def read_energy_j(self) -> float:
        """Joules consumed since an arbitrary fixed point; never decreases."""

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Release the backend's resources (a no-op unless the backend holds any)."""


class ZeusAppleSiliconMeter(PowerMeter):
    """Apple Silicon SoC energy through IOReport (zeus-apple-silicon; no sudo needed)."""

    name = "zeus-apple-silicon"
    # cpu_total_mj already includes the per-core and core-manager figures, so those are not added.
    _FIELDS = ("cpu_total_mj", "gpu_mj", "gpu_sram_mj", "dram_mj", "ane_mj")
    _WINDOW = "pomona-power"

    def __init__(self) -> None:
        if sys.platform != "darwin":
            raise RuntimeError(f"not macOS ({sys.platform})")
        from zeus_apple_silicon import AppleEnergyMonitor  # macOS-only wheel; lazy on purpose

        self._monitor = AppleEnergyMonitor()
        self._cumulative = hasattr(self._monitor, "get_cumulative_energy")
        self._total_j = 0.0
        if not self._cumulative:
            # Older releases only have windows: keep one open and roll it forward on each read.
            self._monitor.begin_window(self._WINDOW)

    @classmethod
    def total_mj(cls, metrics: Any) -> float:
        """Sum of the subsystem fields the hardware reports (None = not available on this chip)."""
        values = [getattr(metrics, field, None) for field in cls._FIELDS]
        if values[0] is None:  # releases before 1.0 called the CPU total `cpu_mj`
            values[0] = getattr(metrics, "cpu_mj", None)
        present = [float(v) for v in values if v is not None]
        if not present:
            raise RuntimeError("no energy fields reported (cpu, gpu, dram, ane all unavailable)")
        return sum(present)

    def read_energy_j(self) -> float:
        if self._cumulative:
            return self.total_mj(self._monitor.get_cumulative_energy()) / 1000.0
        self._total_j += self.total_mj(self._monitor.end_window(self._WINDOW)) / 1000.0
        self._monitor.begin_window(self._WINDOW)
        return self._total_j


class NvmlMeter(PowerMeter):
    """NVIDIA GPUs through NVML (nvidia-ml-py): total energy since driver load, all devices summed."""

    name = "nvml"

    def __init__(self) -> None:
        import pynvml  # optional extra; ImportError = backend unavailable

        self._nvml = pynvml
        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            pynvml.nvmlShutdown()
            raise RuntimeError("no NVIDIA devices")
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]

    def read_energy_j(self) -> float:
        # Pre-Volta GPUs raise NVMLError_NotSupported here, which detection treats as unavailable.
        total_mj = sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles)
        return total_mj / 1000.0

    def close(self) -> None:
        self._nvml.nvmlShutdown()


class RaplMeter(PowerMeter):
    """Linux RAPL through powercap: the top-level package zones that can be read, summed.

    `energy_uj` wraps at `max_energy_range_uj`; a wrap is seen as a counter that went down, so the
    meter must be read at least once per wrap period (tens of minutes at typical package power).
    `skipped` lists "zone: why" for zones left out (unreadable without root, malformed, ...).
    """

    name = "rapl"

    def __init__(self, root: Path | str = RAPL_ROOT) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise RuntimeError(f"no powercap directory at {self.root}")
        self.skipped: list[str] = []
        zones: list[tuple[Path, int, int]] = []  # (energy_uj path, max range uJ, first raw uJ)
        names: list[str] = []
        for zone in sorted(p for p in self.root.iterdir() if _TOP_LEVEL_ZONE.match(p.name)):
            try:
                max_uj = self._read_uj(zone / "max_energy_range_uj")
                raw_uj = self._read_uj(zone / "energy_uj")
                name = (zone / "name").read_text().strip() if (zone / "name").exists() else zone.name
            except (OSError, ValueError) as error:
                self.skipped.append(f"{zone.name}: {type(error).__name__}: {error}")
                continue
            if max_uj <= 0:
                self.skipped.append(f"{zone.name}: max_energy_range_uj is {max_uj}")
                continue
            zones.append((zone / "energy_uj", max_uj, raw_uj))
            names.append(name)
        if not zones:
            why = "; ".join(self.skipped) or "no intel-rapl:N zones"
            raise RuntimeError(f"no readable RAPL package zone under {self.root} ({why})")
        if "psys" in names:
            # The platform (psys) domain already contains the packages: summing both double-counts.
            zones = [z for z, n in zip(zones, names) if n == "psys"]
        self.zone_paths = [path for path, _, _ in zones]
        self._max_uj = [max_uj for _, max_uj, _ in zones]
        self._last_uj = [raw for _, _, raw in zones]
        self._total_uj = 0

    def _read_uj(self, path: Path) -> int:
        """One counter file, in microjoules (a seam for tests that fake the counter)."""
        return int(path.read_text().strip())

    def read_energy_j(self) -> float:
        for i, path in enumerate(self.zone_paths):
            raw = self._read_uj(path)
            delta = raw - self._last_uj[i]
            if delta < 0:  # the counter wrapped past max_energy_range_uj back to 0
                delta += self._max_uj[i]
            self._total_uj += delta
            self._last_uj[i] = raw
        return self._total_uj / 1e6


def _backends() -> list[tuple[str, Callable[[], PowerMeter]]]:
    return [
        (ZeusAppleSiliconMeter.name, ZeusAppleSiliconMeter),
        (NvmlMeter.name, NvmlMeter),
        (RaplMeter.name, RaplMeter),
    ]


def detect_meter_with_reasons(
    backends: Sequence[tuple[str, Callable[[], PowerMeter]]] | None = None,
) -> tuple[PowerMeter | None, list[str]]:
    """The first backend that builds and gives a first reading, and "backend: why not" for the
    ones tried before it (all of them when the result is None). Order: zeus, nvml, rapl."""
    reasons: list[str] = []
    for name, factory in _backends() if backends is None else backends:
        meter: PowerMeter | None = None
        try:
            meter = factory()
            meter.read_energy_j()  # some backends build fine and only fail when read
        except Exception as error:  # any failure just means "not this backend"; say which
            reasons.append(f"{name}: {type(error).__name__}: {error}".rstrip(": "))
            if meter is not None:
                with contextlib.suppress(Exception):  # closing a broken backend may fail too
                    meter.close()
            continue
        return meter, reasons
    return None, reasons


def detect_meter() -> PowerMeter | None:
    """The first working meter on this machine, or None (then use `estimated_profile`)."""
    return detect_meter_with_reasons()[0]


def measured_basis(meter: PowerMeter) -> str:
    return f"measured ({meter.name})"


class EnergyWindow:
    """`with EnergyWindow(meter) as window: ...`, then `window.joules`, `.seconds`, `.watts`."""

    def __init__(self, meter: PowerMeter, clock: Callable[[], float] = time.monotonic) -> None:
        self.meter = meter
        self._clock = clock
        self.joules = 0.0
        self.seconds = 0.0

    def __enter__(self) -> EnergyWindow:
        self._start_s = self._clock()
        self._start_j = self.meter.read_energy_j()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.joules = self.meter.read_energy_j() - self._start_j
        self.seconds = self._clock() - self._start_s

    @property
    def watts(self) -> float:
        """Average power over the window (0 for an empty window rather than a division by zero)."""
        return self.joules / self.seconds if self.seconds > 0 else 0.0


def measure_window(meter: PowerMeter, fn: Callable[[], T]) -> tuple[T, float, float]:
    """Run `fn` once; return (its result, joules used meanwhile, seconds it took)."""
    with EnergyWindow(meter) as window:
        result = fn()
    return result, window.joules, window.seconds


def measure_idle_and_busy(
    meter: PowerMeter,
    busy_fn: Callable[[], object],
    idle_s: float = 2.0,
    busy_s: float = 3.0,
    sleep: Callable[[float], None] = time.sleep,
) -> PowerProfile:
    """Average watts while sleeping `idle_s`, then while calling `busy_fn` repeatedly for at least
    `busy_s` (at least once). Takes about idle_s + busy_s + one busy_fn call; each call should be
    much shorter than busy_s, since a running call cannot be cut short."""
    if idle_s <= 0 or busy_s <= 0:
        raise ValueError(f"idle_s and busy_s must be positive (got {idle_s}, {busy_s})")
    with EnergyWindow(meter) as idle:
        sleep(idle_s)
    with EnergyWindow(meter) as busy:
        # Repeat so a fast compute step still fills a window long enough for the counter's
        # resolution (RAPL ~1 ms updates, IOReport samples) to average out.
        deadline = time.monotonic() + busy_s
        busy_fn()
        while time.monotonic() < deadline:
            busy_fn()
    return PowerProfile(idle_w=idle.watts, busy_w=busy.watts, basis=measured_basis(meter))


def estimated_power(idle_w: float, max_w: float, utilisation: float) -> float:
    """Linear model between idle and full load: idle + (max - idle) x utilisation (clamped 0..1)."""
    if idle_w < 0 or max_w < idle_w:
        raise ValueError(f"need 0 <= idle_w <= max_w (got idle_w={idle_w}, max_w={max_w})")
    utilisation = min(1.0, max(0.0, utilisation))
    return idle_w + (max_w - idle_w) * utilisation


def estimated_profile(idle_w: float, max_w: float, basis: str) -> PowerProfile:
    """A profile from published or configured watts; `basis` says where they came from, e.g.
    "cluster.yaml power" -> "estimated (cluster.yaml power)"."""
    estimated_power(idle_w, max_w, 1.0)  # same validation as the model it stands for
    # Accept an already-wrapped basis too, so a caller passing "estimated (...)" is not doubled.
    text = basis if basis.startswith("estimated (") else f"estimated ({basis})"
    return PowerProfile(idle_w=idle_w, busy_w=max_w, basis=text)
