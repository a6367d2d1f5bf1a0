"""A Machine into a snapshot directory (proto/snapshot.py) and, for restores, where each guest's disk copies go.

Written by the worker with every vCPU parked and every virtio model paused
(requests in hand finished), so RAM, queues and disks agree.  Writable
disks are copied because a guest that runs on after the snapshot would
change them under it; read-only ones are referred to by path.  A restored
guest gets a private copy of each (`private_disks`): clones must never
share a writable image.
"""
from pyhv.proto.snapshot import Writer


def writable_disks(config):
    """[(device name, image path)] of the guest's writable virtio-blk disks."""
    from pyhv.devices.virtio import kinds
    return [(name, spec.options["path"]) for name, _, spec in kinds.named(config.devices)
            if spec.kind == "blk" and "ro" not in spec.options]


def private_disks(snapshot, config, path_of):
    """`config` with each writable disk of `snapshot` at `path_of(device)`, and a copy of its image there."""
    from pyhv.devices.virtio import kinds
    disks = snapshot.disks()
    config = config.replace(devices=[
        d.replace(options={**d.options, "path": path_of(name)}) if name in disks else d
        for name, _, d in kinds.named(config.devices)])
    for device in disks:
        snapshot.copy_disk(device, path_of(device))
    return config


def write_snapshot(machine, config, path, handover=False):
    """Write the paused `machine` (of `config`) into `path`; its size in bytes.  Nothing is left on failure.

    `handover` (a migration on this machine): the state only; RAM and disks change hands as they are."""
    writer = Writer(path, durable=not handover)
    try:
        writer.state(machine.save_state())
        if not handover:
            writer.memory(machine.mem_fd, config.mem_bytes)
            for device, image in writable_disks(config):
                writer.disk(device, image)
        writer.commit(config.replace(gdb=None, trace=None), handover)   # restored: no debugger, no trace unless asked
    except BaseException:
        writer.abort()
        raise
    return sum(sum(length for _, length in e["extents"]) if "extents" in e else e["size"]
               for e in writer.files.values())
