"""The Linux guest artefacts: fetch.sh builds them (Debian's kernel and busybox, our kernel, an initramfs);
installed with pyhv so that `hvctl guests fetch` works from a wheel too."""
import os

HERE = os.path.dirname(os.path.abspath(__file__))
FETCH = os.path.join(HERE, "fetch.sh")
DEFAULT_DIR = "/var/cache/pyhv"
# what fetch.sh leaves in the artefacts dir: (path inside it, what it is)
ARTEFACTS = (("own/vmlinux", "our kernel (ELF): boots to user space in about a minute here"),
             ("own/bzImage", "the same kernel as a bzImage"),
             ("initramfs.cpio", "busybox initramfs; its /init reads pyhv.run=CMD from the command line"),
             ("stock/vmlinuz", "Debian's cloud kernel, unmodified"),
             ("stock-initramfs.cpio", "the busybox initramfs plus the stock kernel's virtio modules, which init loads"),
             ("busybox", "static busybox"))


def artefacts_dir():
    return os.environ.get("HV_ARTEFACTS", DEFAULT_DIR)
