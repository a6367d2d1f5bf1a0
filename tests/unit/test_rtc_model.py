"""The CMOS RTC model: BCD host time in 24-hour mode, valid status, CMOS RAM bytes kept."""
import calendar

from pyhv.devices.legacy.rtc import CENTURY, DAY, HOURS, MINUTES, MONTH, SECONDS, STATUS_B, STATUS_D, YEAR, CmosRtc

WHEN = calendar.timegm((2026, 11, 24, 23, 59, 7, 0, 0, 0))


def reg(rtc, index):
    rtc.write(0, bytes([0x80 | index]))       # NMI-disable bit set, as Linux does: ignored
    return rtc.read(1, 1)[0]


def test_time_registers_are_bcd_utc():
    rtc = CmosRtc(clock=lambda: WHEN)
    assert [reg(rtc, r) for r in (SECONDS, MINUTES, HOURS, DAY, MONTH, YEAR, CENTURY)] == \
        [0x07, 0x59, 0x23, 0x24, 0x11, 0x26, 0x20]


def test_status_says_bcd_24h_and_valid_with_no_update_in_progress():
    rtc = CmosRtc(clock=lambda: WHEN)
    assert reg(rtc, 0x0A) & 0x80 == 0
    assert reg(rtc, STATUS_B) == 0x02
    assert reg(rtc, STATUS_D) == 0x80


def test_cmos_ram_keeps_bytes_but_the_clock_cannot_be_set():
    rtc = CmosRtc(clock=lambda: WHEN)
    rtc.write(0, bytes([0x40]))
    rtc.write(1, b"\x5a")
    assert reg(rtc, 0x40) == 0x5A
    rtc.write(0, bytes([SECONDS]))
    rtc.write(1, b"\x00")
    assert reg(rtc, SECONDS) == 0x07
    assert rtc.read(0, 1) == bytes([SECONDS])
