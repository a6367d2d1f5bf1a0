"""Least privilege per process role: no_new_privs, dropped capabilities, Landlock and a seccomp allow-list each.

Every pyhv process calls `apply(ROLE)` once its set-up is done (sockets
bound, fds received, images and TAPs opened, the VM built), before it serves
anything a guest or a peer controls:

    role        where apply() is called                     filter
    supervisor  Server.serve, after binding its sockets     the union of every role below + spawning
    zygote      zygote.main, after its imports              its own calls + the worker's (it forks them)
    worker      worker.serve, after the Machine is built,   KVM ioctls, threads, eventfds, files (snapshots,
                before the vCPUs start (its console and     traces), sockets; no execve (services are started
                control sockets are bound after them)       by the supervisor)
    runner      `hvctl run` (vcpu_worker/runner.py), same   the worker's + spawning its services, plugins and
                point; it is a worker that spawns           switch (so their lists too)
    service     devices/virtio/service.py, after the model  ZeroMQ, eventfds, the memfd, I/O on its given fds,
                is built (image and TAP opened), before     TAP ioctls; no files, no exec, no fork
                any thread starts (Landlock)
    switch      devices/net/switch.py, after its lock,      ZeroMQ, its stats file
                before ZeroMQ starts (Landlock)
    receiver    supervisor/receiver.py, once told where     the stream's socket, the RAM memfd, files in the
                the guest's state goes, before the source   dir of the guest's state (Landlock)
                connects
    plugin      devices/plugin/host.py, before the user's   a deny-list (the user's code cannot be listed):
                code is loaded (and for --describe)         see DENIED and docs/plugins.md

Why these choices (docs/threat-model.md has the whole story):

- **Filters stack.**  A seccomp filter is inherited across fork and execve
  and can only be narrowed, and every role descends from the supervisor (or
  `hvctl run`), so a parent's list must hold what its descendants do, from
  their execve until their own filter is loaded and after it.  The lists are
  therefore data (`OWN`, what each role does itself) plus `SPAWNS` (whom it
  starts); `allowed(role)` is the closure.  What every role is denied
  (`DENIED`: ptrace, mount, kexec, modules, bpf, perf_event_open, keyctl,
  setuid and friends, namespaces...) is in no list at all, so no process of
  the tree can do it.
- **libseccomp through ctypes** (libseccomp.so.2, which apt itself depends
  on, so every Debian machine has it): four functions, no new dependency.
  `clone` is allowed only without namespace flags; `clone3`, whose flags are
  behind a pointer the filter cannot read, answers ENOSYS, so glibc falls back
  to `clone`.  `ioctl` is allowed by type (the request's bits 8-15): 'T'
  (terminals, TUN) everywhere, KVM's 0xAE where a VM lives, pidfs' 0xFF
  (PIDFD_GET_INFO: the exit status of a process one did not start).
- **Modes**: HV_SECCOMP=enforce (default: a call outside the list kills the
  process with SIGSYS), log (it is allowed and the kernel logs it: audit
  type=1326 lines in dmesg; `python -m pyhv.proto.sandbox collect` turns them
  into the names missing from each role's list), off (no seccomp and no
  Landlock; no_new_privs and dropped capabilities stay).  Children inherit it
  through the environment.
- **Capabilities**: services, switches and plugins drop every capability
  (effective, permitted, inheritable, ambient and the bounding set, with
  SECBIT_NOROOT locked) but keep uid 0.  An unprivileged uid would need the
  runtime dir (0700, the user's) opened to it; uid 0 without capabilities is
  the owner of the user's files and nothing more: no CAP_DAC_OVERRIDE on
  others', no CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_SYS_PTRACE...  The worker
  keeps its (it is root on these machines for /dev/kvm, and a capability
  drop there would buy little while its filter allows what KVM needs).
- **Landlock** (where the kernel offers it: `landlock_abi()`): a device
  service may read only the interpreter's and pyhv's files (lazy imports)
  and write nowhere (its disk is the fd it was given; its ZeroMQ peers are
  already connected); a switch may also write in its runtime dir (stats
  file, its socket).  TCP bind/connect are denied (ABI 4+), and so are
  signals and abstract sockets outside the process (ABI 6+).
- **No core dumps** (RLIMIT_CORE 0): a seccomp kill would otherwise dump
  the process, guest RAM included, into its working directory.
- **Closing what a role was not given**: spawned roles get exactly their fds
  (subprocess close_fds + pass_fds), the zygote's worker closes every fd but
  its own before anything else (supervisor/zygote.py); tests check
  /proc/PID/fd of every role.

The state of this process (role, mode, what took effect) is `status()`,
shown by `hvctl info` (supervisor) and `hvctl stats` (worker).
"""
import ctypes
import os
import re
import resource                         # imported here, not in apply(): a forked worker would pay ~1 ms
import sys

ENV = "HV_SECCOMP"
MODES = ("enforce", "log", "off")
LOG_PIDS_ENV = "HV_SECCOMP_PIDS"        # a file where each process appends "pid role" (for `collect`)
SIGSYS_TEXT = "killed by SIGSYS: a system call outside its seccomp filter (HV_SECCOMP=log to find it)"

# --- the lists ---------------------------------------------------------------------------------------------------
# Names, not numbers (libseccomp resolves them for this architecture; a name this kernel lacks is skipped).

PYTHON = {      # CPython, glibc and pyzmq in any process: memory, signals, time, threads, polling, plain fd I/O
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2",
    "close", "close_range", "fstat", "newfstatat", "statx", "lseek", "fcntl", "dup", "dup2", "dup3",
    "mmap", "munmap", "mprotect", "mremap", "madvise", "brk", "msync",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigtimedwait", "sigaltstack", "restart_syscall",
    "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid",
    "getgroups", "getpgrp", "getpgid", "getsid", "getpriority", "capget",
    "futex", "futex_waitv", "set_robust_list", "get_robust_list", "rseq", "set_tid_address", "sched_yield",
    "sched_getaffinity", "sched_setaffinity", "sched_getparam", "sched_getscheduler", "sched_setscheduler",
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday", "time",
    "getrandom", "uname", "getrlimit", "prlimit64", "getrusage", "sysinfo", "times",
    "poll", "ppoll", "select", "pselect6", "epoll_create", "epoll_create1", "epoll_ctl", "epoll_wait",
    "epoll_pwait", "epoll_pwait2", "eventfd", "eventfd2", "pipe", "pipe2", "timerfd_create", "timerfd_settime",
    "timerfd_gettime", "signalfd4",
    "exit", "exit_group", "tgkill", "tkill", "kill", "rt_sigqueueinfo",
    "getcwd", "readlink", "readlinkat", "getdents64", "access", "faccessat", "faccessat2", "stat", "lstat",
    "open", "openat", "fsync", "fdatasync", "ftruncate", "fadvise64", "flock", "fallocate",
    "sendfile", "copy_file_range", "splice",
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4", "sendto", "recvfrom", "sendmsg",
    "recvmsg", "sendmmsg", "recvmmsg", "getsockopt", "setsockopt", "getsockname", "getpeername", "shutdown",
    "memfd_create", "membarrier", "ioctl", "clone", "clone3",
}
FILES = {       # making and removing files and dirs (logs, state, snapshots, result.json)
    "mkdir", "mkdirat", "rmdir", "unlink", "unlinkat", "rename", "renameat", "renameat2", "link", "linkat",
    "symlink", "symlinkat", "chmod", "fchmod", "fchmodat", "fchown", "utimensat", "truncate", "chdir", "fchdir",
    "statfs", "fstatfs", "inotify_init1", "inotify_add_watch", "inotify_rm_watch",
}
SPAWN = {       # starting and watching processes
    "execve", "execveat", "vfork", "fork", "wait4", "waitid", "setsid", "setpgid", "setpriority", "prctl",
    "pidfd_open", "pidfd_send_signal", "pidfd_getfd", "process_madvise",
    # what a child does between its execve and its own filter: dropping privileges and loading that filter
    "capset", "seccomp", "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self",
    "setrlimit", "umask", "arch_prctl", "personality",
}
KVM = {"mlock", "munlock", "madvise", "mbind", "set_mempolicy", "get_mempolicy", "sched_setaffinity"}

OWN = {
    "supervisor": PYTHON | FILES | SPAWN,
    "zygote": PYTHON | SPAWN - {"execve", "execveat"},
    "worker": PYTHON | FILES | KVM | {"pidfd_send_signal"},      # it kills its device services by pidfd
    "runner": PYTHON | FILES | KVM | SPAWN,
    "service": PYTHON,
    "switch": PYTHON | FILES,
    "receiver": PYTHON | FILES,         # a migration's stream into RAM, the state written as a hand-over dir
    "plugin": PYTHON,                   # its base for the parents' lists; the plugin's own filter is DENIED
}
SPAWNS = {                              # the roles a role's processes start (or fork): its list includes theirs
    "supervisor": ("zygote", "worker", "service", "switch", "receiver", "plugin"),
    "zygote": ("worker",),
    "runner": ("service", "switch", "plugin"),
}
IOCTL_TYPES = {                         # ioctl request types (bits 8-15) each role may use
    "supervisor": {0x54, 0xAE, 0xFF},
    "zygote": {0x54, 0xAE, 0xFF},
    "worker": {0x54, 0xAE, 0xFF},
    "runner": {0x54, 0xAE, 0xFF},
    "service": {0x54},                  # 'T': terminals (isatty), FIONBIO/FIOCLEX, TUNSETIFF
    "switch": {0x54},
    "receiver": {0x54},
    "plugin": {0x54},
}
DENIED = {      # what no role does: absent from every list; what a plugin's deny-list kills
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "mount", "umount2", "pivot_root", "chroot",
    "move_mount", "open_tree", "fsopen", "fsmount", "fsconfig", "fspick", "mount_setattr", "unshare", "setns",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "bpf", "perf_event_open",
    "keyctl", "add_key", "request_key", "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
    "setgroups", "setfsuid", "setfsgid", "reboot", "swapon", "swapoff", "acct", "quotactl", "quotactl_fd",
    "settimeofday", "clock_settime", "adjtimex", "clock_adjtime", "syslog", "iopl", "ioperm", "userfaultfd",
    "open_by_handle_at", "name_to_handle_at", "lookup_dcookie", "fanotify_init", "sethostname",
    "setdomainname", "vhangup", "mknod", "mknodat", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "uselib", "nfsservctl", "create_module", "get_kernel_syms", "query_module", "vm86", "vm86old",
}
PARTLY = {      # calls a role without them in its list may still make with these values of one argument
    "prctl": (0, {15, 16}),             # PR_SET_NAME, PR_GET_NAME: libzmq names its threads
}
REFUSED = {"unlink", "unlinkat"}       # outside a list: EACCES, not a kill (a service's console socket is
                                        # removed on a best-effort basis at exit, as Landlock would refuse it)
NO_CAPS = {"service", "switch", "receiver", "plugin"}
LANDLOCKED = {"service", "switch", "receiver"}
NS_FLAGS = 0x7E020000                   # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET
ROLES = tuple(OWN)


def allowed(role):
    """The system calls `role`'s filter allows: its own and, since filters stack, every role it starts."""
    names = set(OWN[role])
    for child in SPAWNS.get(role, ()):
        names |= allowed(child)
    return names - DENIED


def ioctl_types(role):
    types = set(IOCTL_TYPES[role])
    for child in SPAWNS.get(role, ()):
        types |= ioctl_types(child)
    return types


def mode():
    """HV_SECCOMP: enforce (the default), log or off.  A bad value is a UserError."""
    value = os.environ.get(ENV, "enforce") or "enforce"
    if value not in MODES:
        from pyhv.proto.errors import UserError
        raise UserError(f"{ENV}={value!r}: use one of {', '.join(MODES)}")
    return value


# --- libseccomp (ctypes) -----------------------------------------------------------------------------------------

ACT_KILL_PROCESS = 0x80000000
ACT_LOG = 0x7FFC0000
ACT_ALLOW = 0x7FFF0000
ACT_ERRNO = 0x00050000
SYS_SECCOMP = 317                       # x86-64
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
CMP_EQ = 4
CMP_MASKED_EQ = 7
ENOSYS = 38
EACCES = 13


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


_lib = None


def _seccomp():
    global _lib
    if _lib is None:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        lib.seccomp_init.restype = ctypes.c_void_p
        lib.seccomp_init.argtypes = [ctypes.c_uint32]
        lib.seccomp_release.argtypes = [ctypes.c_void_p]
        lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
        lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                               ctypes.POINTER(_ArgCmp)]
        lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        lib.seccomp_syscall_resolve_num_arch.argtypes = [ctypes.c_uint32, ctypes.c_int]
        lib.seccomp_syscall_resolve_num_arch.restype = ctypes.c_void_p      # a malloc'd char *
        _lib = lib
    return _lib


def syscall_number(name):
    """This architecture's number of system call `name`, or None."""
    nr = _seccomp().seccomp_syscall_resolve_name(name.encode())
    return None if nr < 0 else nr


def syscall_name(nr):
    """The name of system call number `nr` on this architecture (or "syscall NR")."""
    lib = _seccomp()
    p = lib.seccomp_syscall_resolve_num_arch(0, nr)          # 0: the native architecture
    if not p:
        return f"syscall {nr}"
    name = ctypes.string_at(p).decode()
    ctypes.CDLL(None).free(ctypes.c_void_p(p))
    return name


def _add(lib, ctx, action, name, *cmps):
    nr = syscall_number(name)
    if nr is None:
        return
    arr = (_ArgCmp * len(cmps))(*cmps) if cmps else None
    rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
    if rc < 0:
        raise OSError(-rc, f"seccomp_rule_add({name}): {os.strerror(-rc)}")


def _build(lib, role, log):
    """A libseccomp context holding `role`'s rules (the caller releases it)."""
    if role == "plugin":
        default, deny = ACT_ALLOW, (ACT_LOG if log else ACT_KILL_PROCESS)
    else:
        default, deny = (ACT_LOG if log else ACT_KILL_PROCESS), None
    ctx = lib.seccomp_init(default)
    if not ctx:
        raise OSError(ctypes.get_errno() or 22, "seccomp_init failed")
    try:
        if deny is not None:
            for name in sorted(DENIED):
                _add(lib, ctx, deny, name)
            for bit in (1 << i for i in range(32) if NS_FLAGS >> i & 1):    # no "masked not-equal": a rule a flag
                _add(lib, ctx, deny, "clone", _ArgCmp(0, CMP_MASKED_EQ, bit, bit))
            _add(lib, ctx, deny, "ioctl", _ArgCmp(1, CMP_MASKED_EQ, 0xFF00, 0xAE00))
        else:
            names = allowed(role)
            for name in sorted(names - {"clone", "clone3", "ioctl"}):
                _add(lib, ctx, ACT_ALLOW, name)
            _add(lib, ctx, ACT_ALLOW, "clone", _ArgCmp(0, CMP_MASKED_EQ, NS_FLAGS, 0))
            for name, (arg, values) in PARTLY.items():
                if name not in names:
                    for value in sorted(values):
                        _add(lib, ctx, ACT_ALLOW, name, _ArgCmp(arg, CMP_EQ, value, 0))
            for name in sorted(REFUSED - names):
                _add(lib, ctx, ACT_ERRNO | EACCES, name)
            for t in sorted(ioctl_types(role)):
                _add(lib, ctx, ACT_ALLOW, "ioctl", _ArgCmp(1, CMP_MASKED_EQ, 0xFF00, t << 8))
        _add(lib, ctx, ACT_ERRNO | ENOSYS, "clone3")
    except BaseException:
        lib.seccomp_release(ctx)
        raise
    return ctx


_programs = {}          # (role, log) -> the filter as classic BPF: built once, loaded by every process forked after


def program(role, log=False):
    """`role`'s filter compiled to BPF (struct sock_filter array).  libseccomp builds it in ~2 ms; a zygote
    calls this before it forks, so each worker only loads the bytes (see prepare())."""
    key = (role, log)
    if key not in _programs:
        lib = _seccomp()
        ctx = _build(lib, role, log)
        try:
            fd = os.memfd_create("seccomp-bpf", os.MFD_CLOEXEC)
            try:
                rc = lib.seccomp_export_bpf(ctx, fd)
                if rc < 0:
                    raise OSError(-rc, f"seccomp_export_bpf: {os.strerror(-rc)}")
                _programs[key] = os.pread(fd, os.fstat(fd).st_size, 0)
            finally:
                os.close(fd)
        finally:
            lib.seccomp_release(ctx)
    return _programs[key]


def prepare(role):
    """Compile `role`'s filter now, in HV_SECCOMP's mode, so that processes forked from this one load it
    without building it (the zygote does this for its workers)."""
    how = mode()
    if how != "off":
        program(role, log=(how == "log"))


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def load_filter(role, log=False):
    """Load `role`'s filter on every thread of this process (TSYNC).  log: what the list lacks is logged and
    allowed instead of killing the process."""
    code = program(role, log)
    prog = _SockFprog(len(code) // 8, code)
    rc = _libc.syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, ctypes.byref(prog))
    if rc != 0:         # > 0: the id of a thread that could not be synchronised
        err = ctypes.get_errno() if rc < 0 else 0
        raise OSError(err, f"seccomp({role}): " + (os.strerror(err) if rc < 0 else f"thread {rc} not synchronised"))


# --- no_new_privs, capabilities, Landlock ------------------------------------------------------------------------

PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECURE_BITS = 0x2F      # NOROOT, NO_SETUID_FIXUP and KEEP_CAPS, each with its _LOCKED bit (KEEP_CAPS itself off)
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _check(rc, what):
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


def set_no_new_privs():
    """execve can never grant more than we have (setuid bits, file capabilities); a seccomp filter needs it."""
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")


def drop_capabilities():
    """Every capability set empty (the bounding set too) and root's automatic ones locked off.  Without
    CAP_SETPCAP (not root) there is nothing to drop: False."""
    with open("/proc/self/status") as f:
        eff = int(re.search(r"^CapEff:\s*([0-9a-f]+)", f.read(), re.M).group(1), 16)
    if not eff and os.geteuid() != 0:
        return False
    _check(_libc.prctl(PR_SET_SECUREBITS, SECURE_BITS, 0, 0, 0), "PR_SET_SECUREBITS")
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"PR_CAPBSET_DROP {cap}")
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "PR_CAP_AMBIENT_CLEAR_ALL")
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()                                  # two empty __user_cap_data_struct
    _check(_libc.syscall(syscall_number("capset"), header, data), "capset")
    return True


SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1, 2, 4, 8
FS_RIGHTS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
FS_READ = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
FS_REMOVE_DIR, FS_REMOVE_FILE, FS_MAKE_DIR, FS_MAKE_REG, FS_MAKE_SOCK = 1 << 4, 1 << 5, 1 << 7, 1 << 8, 1 << 9
FS_TRUNCATE = 1 << 14
FS_WRITE = FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_DIR | FS_MAKE_REG | FS_MAKE_SOCK | FS_TRUNCATE
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi():
    """The Landlock ABI version this kernel offers (0: none, or disabled)."""
    rc = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                       ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return max(rc, 0)


def code_paths():
    """What a Landlocked process must still read: the interpreter's and pyhv's files (lazy imports)."""
    import pyhv
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, pyhv.import_root()}
    paths.update(p for p in sys.path if p)
    return sorted(p for p in paths if os.path.isdir(p))


def landlock(read=(), write=()):
    """Confine this thread and the threads it starts from now on (call it before any other thread exists):
    files may be read only below `read`, written (files and dirs made, removed, truncated; sockets made) only
    below `write`; no TCP (ABI 4+), no signals or abstract sockets outside
    the process (ABI 6+).  Returns the ABI used, 0 if the kernel has no Landlock."""
    abi = landlock_abi()
    if not abi:
        return 0
    handled = FS_RIGHTS_BY_ABI.get(abi, FS_RIGHTS_BY_ABI[5])
    attr = _RulesetAttr(handled, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0,
                        SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else (16 if abi >= 4 else 8)
    rfd = _check(_libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                               ctypes.c_uint32(0)), "landlock_create_ruleset")
    try:
        rules = [(p, FS_READ) for p in read]
        rules += [(p, (FS_READ | FS_WRITE) & handled) for p in write]
        for path, access in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = _PathBeneath(access & handled, fd)
                _check(_libc.syscall(SYS_LANDLOCK_ADD_RULE, rfd, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule),
                                     0), f"landlock_add_rule {path}")
            finally:
                os.close(fd)
        _check(_libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, rfd, 0), "landlock_restrict_self")
    finally:
        os.close(rfd)
    return abi


# --- applying a role ---------------------------------------------------------------------------------------------

_status = {"role": None, "mode": "off", "seccomp": False, "no_new_privs": False, "capabilities": "kept",
           "landlock": 0}


def apply(role, writable=()):
    """Make this process `role` from now on (see the module docstring): no_new_privs, capabilities dropped
    where the role says, Landlock where the role and the kernel allow (`writable`: dirs a switch writes in),
    then the seccomp filter in HV_SECCOMP's mode.  Call it once, after set-up, before serving."""
    if role not in OWN:
        raise ValueError(f"no sandbox role {role!r}")
    how = mode()
    _status.update(role=role, mode=how)
    if role in NO_CAPS and drop_capabilities():
        _status["capabilities"] = "none"
    # a killed process dumps no core: a worker's or a service's would hold guest RAM
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    set_no_new_privs()
    _status["no_new_privs"] = True
    if how == "off":
        return dict(_status)
    if os.environ.get(LOG_PIDS_ENV):
        with open(os.environ[LOG_PIDS_ENV], "a") as f:
            f.write(f"{os.getpid()} {role}\n")
    if role in LANDLOCKED:
        threads = len(os.listdir("/proc/self/task"))
        if threads != 1:
            raise RuntimeError(f"sandbox.apply({role!r}) with {threads} threads: Landlock would miss all but this one")
        _status["landlock"] = landlock(read=code_paths() + [f"/proc/{os.getpid()}"], write=writable)
    load_filter(role, log=(how == "log"))
    _status["seccomp"] = True
    return dict(_status)


def status():
    """This process's role and what apply() made true: for `hvctl info` and `hvctl stats`."""
    return dict(_status)


def proc_status(pid):
    """NoNewPrivs, Seccomp, CapEff, CapBnd of process `pid` as /proc shows them."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("NoNewPrivs", "Seccomp", "Seccomp_filters", "CapEff", "CapPrm", "CapBnd", "CapAmb"):
                out[key] = value.strip()
    return out


# --- how a process ended -----------------------------------------------------------------------------------------

def killed_by(signo, word=""):
    """"killed by SIGNAME" ("killed by signal SIGNAME" with word="signal "), naming SIGSYS as a seccomp kill
    (that is the only way our processes get it)."""
    import signal
    if signo == signal.SIGSYS:
        return SIGSYS_TEXT
    try:
        return f"killed by {word}{signal.Signals(signo).name}"
    except ValueError:
        return f"killed by signal {signo}"


PIDFD_GET_INFO = 0xC040FF0B             # _IOWR(0xFF, 11, struct pidfd_info) (Linux 6.15+)
PIDFD_INFO_EXIT = 1 << 3


_pidfd_info = True      # False once the kernel has said it has no PIDFD_GET_INFO (before 6.13)


def pidfd_exit_status(pidfd):
    """The wait status of the process of `pidfd` once it has been reaped, by whoever its parent was (Linux
    6.15's PIDFD_INFO_EXIT); None if not reaped yet or the kernel cannot tell (pidfd_tells_exit())."""
    global _pidfd_info
    import errno
    import fcntl
    import struct
    if not _pidfd_info:
        return None
    buf = bytearray(64)
    struct.pack_into("Q", buf, 0, PIDFD_INFO_EXIT)
    try:
        fcntl.ioctl(pidfd, PIDFD_GET_INFO, buf)
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EINVAL):
            _pidfd_info = False
        return None
    if not struct.unpack_from("Q", buf, 0)[0] & PIDFD_INFO_EXIT:
        return None
    return struct.unpack_from("i", buf, 60)[0]


def pidfd_tells_exit():
    """False once this kernel has shown it cannot give a reaped process's status through its pidfd: waiting
    for it would only wait."""
    return _pidfd_info


def describe_wait_status(status):
    """"exited with status N" or killed_by(...) for a wait status."""
    if os.WIFSIGNALED(status):
        return killed_by(os.WTERMSIG(status))
    return f"exited with status {os.WEXITSTATUS(status)}"


# --- regenerating the lists (log mode) ---------------------------------------------------------------------------

AUDIT_LINE = re.compile(r"type=1326 .*?\bpid=(\d+) .*?\bcomm=\"([^\"]*)\".*?\bsyscall=(\d+)")


def collect(dmesg_text, pids_text):
    """{role: {syscall name: count}} of the calls logged (audit type=1326) by processes whose "pid role"
    lines are in `pids_text` (the HV_SECCOMP_PIDS file of a log-mode run)."""
    roles = {}
    for line in pids_text.splitlines():
        pid, _, role = line.partition(" ")
        if pid.isdigit():
            roles[int(pid)] = role.strip()
    out = {}
    for m in AUDIT_LINE.finditer(dmesg_text):
        role = roles.get(int(m.group(1)))
        if role is not None:
            name = syscall_name(int(m.group(3)))
            out.setdefault(role, {}).setdefault(name, 0)
            out[role][name] += 1
    return out


def main(argv=None):
    import argparse
    import json
    import subprocess
    p = argparse.ArgumentParser(prog="python -m pyhv.proto.sandbox", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="the calls each role's list lacks, from dmesg after a HV_SECCOMP=log run")
    c.add_argument("pids", help="the HV_SECCOMP_PIDS file of that run")
    c.add_argument("--dmesg", help="read this file instead of running dmesg")
    s = sub.add_parser("show", help="the allow-list of a role")
    s.add_argument("role", choices=ROLES)
    a = p.parse_args(argv)
    if a.cmd == "show":
        print("\n".join(sorted(allowed(a.role))))
        print("ioctl types: " + " ".join(f"{t:#x}" for t in sorted(ioctl_types(a.role))))
        return 0
    if a.dmesg:
        with open(a.dmesg) as f:
            text = f.read()
    else:
        text = subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout
    with open(a.pids) as f:
        found = collect(text, f.read())
    print(json.dumps({r: dict(sorted(n.items())) for r, n in sorted(found.items())}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
