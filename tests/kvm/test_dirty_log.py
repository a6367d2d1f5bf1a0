"""KVM's dirty log on the guest's memory slots (Vm.set_dirty_logging, Vm.dirty_log): exactly the pages a vCPU
wrote, once per write after each fetch; and the two logs together as a migration takes them
(vcpu_worker/migration.py DirtyLog: the vCPUs' log and the devices' dirty map)."""
from pyhv.devices.guest_memory import create_memfd
from pyhv.proto.guest import GuestConfig
from pyhv.vcpu_worker.machine import Machine
from pyhv.vcpu_worker.migration import DirtyLog

MiB = 1 << 20
# Writes one byte to each of 10 pages from 8 MiB on, then exits 0.
WRITER = r"""
    mov $0x800000, %rax
    mov $10, %rcx
1:  movb $1, (%rax)
    add $4096, %rax
    dec %rcx
    jnz 1b
    mov $0x501, %dx
    mov $0, %al
    out %al, %dx
2:  jmp 2b
"""


def run(build_guest, before=None):
    cfg = GuestConfig(name="t", kernel=str(build_guest(WRITER)), boot="raw64", mem_bytes=32 * MiB, timeout=30)
    m = Machine(cfg, create_memfd(cfg.mem_bytes), bytearray().extend, in_process=True)
    if before is not None:
        before(m)
    m.start()
    outcome = m.wait(30)
    m.join()
    assert outcome is not None and outcome.status == 0
    return m


def pages_of(bitmap):
    return [i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1]


def test_the_log_holds_the_pages_vcpus_wrote_and_is_cleared_by_reading(build_guest):
    m = run(build_guest, lambda m: m.vm.set_dirty_logging(True))
    written = set(pages_of(m.vm.dirty_log(0)))
    assert {0x800 + i for i in range(10)} <= written          # the ten pages (the stack and tables besides)
    assert not any(0x900 <= p < 0x2000 for p in written)      # nothing it did not write
    assert pages_of(m.vm.dirty_log(0)) == []                  # taken: cleared
    m.vm.set_dirty_logging(False)


def test_a_migration_takes_vcpu_and_device_writes_together_in_memfd_runs(build_guest):
    logs = []

    def start(m):
        logs.append(DirtyLog(m.vm, m.mem))
        logs[0].start()
    m = run(build_guest, start)
    m.mem.write(20 * MiB, b"d" * 5000)                       # a device's write: two pages, in the dirty map
    runs = logs[0].take()
    assert (0x800000, 10 * 4096) in runs and (20 * MiB, 2 * 4096) in runs
    assert logs[0].take() == []
    logs[0].stop()
