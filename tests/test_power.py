"""Power meters and the estimate: the linear model, RAPL against a fake powercap tree (wrap,
unreadable zones), detection with reasons, and idle/busy measurement with a counter of known slope."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from pomona.power import (
    EnergyWindow,
    PowerMeter,
    RaplMeter,
    ZeusAppleSiliconMeter,
    detect_meter_with_reasons,
    estimated_power,
    estimated_profile,
    measure_idle_and_busy,
    measure_window,
)
from pomona.profiles import PowerProfile


@pytest.mark.parametrize(
    ("idle_w", "max_w", "utilisation", "expected_w"),
    [
        (5.0, 45.0, 0.0, 5.0),
        (5.0, 45.0, 1.0, 45.0),
        (5.0, 45.0, 0.25, 15.0),
        (5.0, 45.0, -0.5, 5.0),  # clamped up to idle
        (5.0, 45.0, 3.0, 45.0),  # clamped down to max
        (7.0, 7.0, 0.6, 7.0),  # no dynamic range
        (0.0, 100.0, 0.5, 50.0),
    ],
)
def test_estimated_power(idle_w: float, max_w: float, utilisation: float, expected_w: float) -> None:
    assert estimated_power(idle_w, max_w, utilisation) == pytest.approx(expected_w)


@pytest.mark.parametrize(("idle_w", "max_w"), [(10.0, 5.0), (-1.0, 5.0)])
def test_estimated_power_rejects_impossible_watts(idle_w: float, max_w: float) -> None:
    with pytest.raises(ValueError, match="idle_w"):
        estimated_power(idle_w, max_w, 0.5)


@pytest.mark.parametrize(
    ("basis", "expected"),
    [
        ("cluster.yaml power", "estimated (cluster.yaml power)"),
        ("estimated (catalogue: mac_mini_2024_m4)", "estimated (catalogue: mac_mini_2024_m4)"),
    ],
)
def test_estimated_profile(basis: str, expected: str) -> None:
    profile = estimated_profile(4.0, 65.0, basis)
    assert profile == PowerProfile(idle_w=4.0, busy_w=65.0, basis=expected)
    assert not profile.measured


def make_zone(
    root: Path, zone: str, energy_uj: object, max_uj: object = 262_143_328_850, name: str = ""
) -> Path:
    path = root / zone
    path.mkdir(parents=True)
    if energy_uj is not None:
        (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
    (path / "name").write_text(f"{name or 'package-' + zone.rsplit(':', 1)[1]}\n")
    return path


def test_rapl_sums_top_level_packages_and_ignores_subzones(tmp_path: Path) -> None:
    p0 = make_zone(tmp_path, "intel-rapl:0", 1_000_000)
    p1 = make_zone(tmp_path, "intel-rapl:1", 5_000_000)
    core = make_zone(tmp_path, "intel-rapl:0:0", 0, name="core")  # inside package 0: not added
    meter = RaplMeter(tmp_path)
    assert meter.name == "rapl"
    assert meter.read_energy_j() == 0.0  # counts from construction
    (p0 / "energy_uj").write_text("3000000\n")  # +2 J
    (p1 / "energy_uj").write_text("5500000\n")  # +0.5 J
    (core / "energy_uj").write_text("9000000\n")
    assert meter.read_energy_j() == pytest.approx(2.5)
    assert meter.zone_paths == [p0 / "energy_uj", p1 / "energy_uj"]


def test_rapl_counter_wrap(tmp_path: Path) -> None:
    zone = make_zone(tmp_path, "intel-rapl:0", 9_000_000, max_uj=10_000_000)
    meter = RaplMeter(tmp_path)
    (zone / "energy_uj").write_text("9500000\n")  # +0.5 J
    assert meter.read_energy_j() == pytest.approx(0.5)
    (zone / "energy_uj").write_text("1500000\n")  # wrapped: +0.5 J to the top, then +1.5 J
    assert meter.read_energy_j() == pytest.approx(2.5)
    (zone / "energy_uj").write_text("1600000\n")  # monotonic after the wrap
    assert meter.read_energy_j() == pytest.approx(2.6)


def test_rapl_psys_alone_avoids_double_counting(tmp_path: Path) -> None:
    package = make_zone(tmp_path, "intel-rapl:0", 0)
    psys = make_zone(tmp_path, "intel-rapl:1", 0, name="psys")
    meter = RaplMeter(tmp_path)
    (package / "energy_uj").write_text("1000000\n")
    (psys / "energy_uj").write_text("3000000\n")
    assert meter.read_energy_j() == pytest.approx(3.0)


def test_rapl_skips_unreadable_zones_with_reasons(tmp_path: Path) -> None:
    make_zone(tmp_path, "intel-rapl:0", 2_000_000)
    make_zone(tmp_path, "intel-rapl:1", None)  # no energy_uj at all
    (tmp_path / "intel-rapl:1" / "energy_uj").mkdir()  # reading it fails even as root
    make_zone(tmp_path, "intel-rapl:2", "garbage")
    make_zone(tmp_path, "intel-rapl:3", 7, max_uj=0)
    meter = RaplMeter(tmp_path)
    assert len(meter.zone_paths) == 1
    assert [reason.split(":")[0:2] for reason in meter.skipped] == [
        ["intel-rapl", "1"],
        ["intel-rapl", "2"],
        ["intel-rapl", "3"],
    ]
    assert "IsADirectoryError" in meter.skipped[0]
    assert "ValueError" in meter.skipped[1]
    assert "max_energy_range_uj is 0" in meter.skipped[2]


def test_rapl_with_nothing_readable_raises_with_reasons(tmp_path: Path) -> None:
    make_zone(tmp_path, "intel-rapl:0", "garbage")
    with pytest.raises(RuntimeError, match="no readable RAPL package zone.*intel-rapl:0: ValueError"):
        RaplMeter(tmp_path)
    with pytest.raises(RuntimeError, match="no powercap directory"):
        RaplMeter(tmp_path / "missing")


def test_detect_meter_on_this_machine() -> None:
    meter, reasons = detect_meter_with_reasons()
    if meter is None:  # the expected case here: not macOS, no NVML, no RAPL
        assert len(reasons) == 3
        assert [r.split(":")[0] for r in reasons] == ["zeus-apple-silicon", "nvml", "rapl"]
        assert all(isinstance(r, str) and len(r) > len("rapl: ") for r in reasons)
    else:  # a machine with a real meter: its first reading worked
        assert isinstance(meter, PowerMeter)
        assert meter.read_energy_j() >= 0.0
        meter.close()


class CountingMeter(PowerMeter):
    name = "fake"

    def __init__(self, fail_on_read: bool = False) -> None:
        self.fail_on_read = fail_on_read
        self.closed = False

    def read_energy_j(self) -> float:
        if self.fail_on_read:
            raise OSError("permission denied")
        return 1.0

    def close(self) -> None:
        self.closed = True


def test_detect_skips_backends_that_fail_at_init_or_first_read() -> None:
    broken_on_read = CountingMeter(fail_on_read=True)
    working = CountingMeter()

    def fails_at_init() -> PowerMeter:
        raise ImportError("No module named 'pynvml'")

    meter, reasons = detect_meter_with_reasons(
        [("nvml", fails_at_init), ("rapl", lambda: broken_on_read), ("fake", lambda: working)]
    )
    assert meter is working
    assert reasons == ["nvml: ImportError: No module named 'pynvml'", "rapl: OSError: permission denied"]
    assert broken_on_read.closed and not working.closed
    assert detect_meter_with_reasons([("nvml", fails_at_init)]) == (None, [reasons[0]])


def test_zeus_total_sums_present_fields_only() -> None:
    metrics = SimpleNamespace(
        cpu_total_mj=1500, gpu_mj=500, gpu_sram_mj=None, dram_mj=250, ane_mj=0, efficiency_cores_mj=[700, 700]
    )  # per-core figures are inside cpu_total
    assert ZeusAppleSiliconMeter.total_mj(metrics) == 2250
    assert ZeusAppleSiliconMeter.total_mj(SimpleNamespace(cpu_mj=10, gpu_mj=5)) == 15
    with pytest.raises(RuntimeError, match="no energy fields"):
        ZeusAppleSiliconMeter.total_mj(SimpleNamespace(cpu_total_mj=None, gpu_mj=None))


class FakeRapl(RaplMeter):
    """A RAPL package whose counter follows time at `watts` (set by the test), starting near the wrap
    so a measurement crosses it. Energy integrates lazily at the power in force since the last read."""

    def __init__(self, root: Path, watts: float) -> None:
        self.watts = watts
        self._uj = 9_800_000.0  # 0.2 J below the 10 J wrap
        self._read_at = time.monotonic()
        super().__init__(root)

    def _read_uj(self, path: Path) -> int:
        if path.name != "energy_uj":
            return int(path.read_text())
        now = time.monotonic()
        self._uj += self.watts * (now - self._read_at) * 1e6
        self._read_at = now
        return int(self._uj) % 10_000_000


def test_measure_idle_and_busy_with_known_power(tmp_path: Path) -> None:
    make_zone(tmp_path, "intel-rapl:0", 0, max_uj=10_000_000)
    meter = FakeRapl(tmp_path, watts=5.0)
    calls = []

    def busy() -> None:
        meter.watts = 20.0  # the counter runs at 20 W from the busy window's first reading
        calls.append(1)
        time.sleep(0.05)

    started = time.monotonic()
    profile = measure_idle_and_busy(meter, busy, idle_s=0.3, busy_s=0.3)
    assert time.monotonic() - started < 1.5  # bounded: idle_s + busy_s + one call, plus slack
    assert profile.basis == "measured (rapl)" and profile.measured
    assert profile.idle_w == pytest.approx(5.0, rel=0.05)  # crossed the wrap during idle
    assert profile.busy_w == pytest.approx(20.0, rel=0.05)
    assert len(calls) >= 2  # repeated until busy_s passed


def test_measure_idle_and_busy_rejects_empty_intervals(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive"):
        measure_idle_and_busy(CountingMeter(), lambda: None, idle_s=0.0)


def test_measure_window_and_energy_window() -> None:
    readings = iter([10.0, 16.0])
    clock = iter([100.0, 103.0])
    meter = SimpleNamespace(read_energy_j=lambda: next(readings))
    with EnergyWindow(meter, clock=lambda: next(clock)) as window:  # type: ignore[arg-type]
        pass
    assert (window.joules, window.seconds, window.watts) == (6.0, 3.0, 2.0)

    rapl_like = CountingMeter()  # constant counter: no energy used
    result, joules, seconds = measure_window(rapl_like, lambda: "done")
    assert result == "done" and joules == 0.0 and seconds >= 0.0
