"""The child side of ``orthoedit.evals.sandbox``: confine this process, then run a program.

``python -I -S confine.py FOLDER SECONDS`` runs ``FOLDER/program.py`` after making these
changes to its own process, in this order. Each one is irrevocable, and all of them happen
before any line of the program runs:

1. resource limits: ``SECONDS`` of CPU time (SIGXCPU then, SIGKILL a second later), 1 GiB of
   address space, files of at most 16 MiB, 64 open files, no core dumps;
2. every capability dropped (``capset``), so a program started by root cannot raise those
   limits again, mount, reboot, load modules or override file permissions;
3. ``no_new_privs``, then a Landlock ruleset (Linux >= 5.13): files may be created, written,
   truncated, renamed or removed only beneath ``FOLDER``; reading stays allowed everywhere
   (the interpreter needs its standard library). Where the kernel's Landlock is new enough it
   also denies TCP bind and connect (ABI 4) and signals and abstract unix sockets to anything
   outside the sandbox (ABI 6);
4. a seccomp filter (x86_64 and aarch64) that fails these system calls with EPERM: creating
   sockets and io_uring instances (no network of any kind), creating processes or threads and
   exec (the program stays one Python process), sending signals and ptrace, and changing file
   modes, owners, extended attributes and timestamps (Landlock does not cover metadata).

If a step cannot be made, nothing runs and the process exits with ``SETUP_FAILED`` after one
line on stderr. Only the standard library is used: the interpreter runs with ``-S`` (no
site-packages) and ``-I`` (no environment variables, no user site, no script folder on the
path). Afterwards the program runs as ``__main__``; it passes when it returns normally, and
any exception, ``SystemExit`` included, makes the exit status 1.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import resource
import struct
import sys

SETUP_FAILED = 97
MEMORY_BYTES = 1 << 30
FILE_BYTES = 16 << 20
OPEN_FILES = 64

# Landlock (include/uapi/linux/landlock.h); the syscall numbers are the same on both arches.
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446
RULESET_VERSION = 1  # LANDLOCK_CREATE_RULESET_VERSION
RULE_PATH_BENEATH = 1  # LANDLOCK_RULE_PATH_BENEATH
FS_WRITE_ABI1 = (
    (1 << 1)  # WRITE_FILE
    | (1 << 4)  # REMOVE_DIR
    | (1 << 5)  # REMOVE_FILE
    | sum(1 << bit for bit in range(6, 13))  # MAKE_CHAR, _DIR, _REG, _SOCK, _FIFO, _BLOCK, _SYM
)
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15  # ABI 2, 3, 5
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2  # ABI 6

# seccomp (include/uapi/linux/seccomp.h, filter.h, audit.h).
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
RET_ALLOW, RET_EPERM, RET_KILL = 0x7FFF0000, 0x00050000 | 1, 0x80000000
LD_W_ABS, JEQ_K, JGE_K, RET_K = 0x20, 0x15, 0x35, 0x06
X32_BIT = 0x40000000
# arch -> (AUDIT_ARCH_*, {call: number}) for the calls the filter denies.
# fmt: off
DENIED = {
    "x86_64": (
        0xC000003E,
        {"socket": 41, "io_uring_setup": 425, "clone": 56, "clone3": 435, "fork": 57,
         "vfork": 58, "execve": 59, "execveat": 322, "kill": 62, "tkill": 200, "tgkill": 234,
         "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297, "pidfd_send_signal": 424,
         "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "chmod": 90,
         "fchmod": 91, "fchmodat": 268, "fchmodat2": 452, "chown": 92, "fchown": 93,
         "lchown": 94, "fchownat": 260, "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190,
         "removexattr": 197, "lremovexattr": 198, "fremovexattr": 199, "utime": 132,
         "utimes": 235, "futimesat": 261, "utimensat": 280},
    ),
    "aarch64": (
        0xC00000B7,
        {"socket": 198, "io_uring_setup": 425, "clone": 220, "clone3": 435, "execve": 221,
         "execveat": 281, "kill": 129, "tkill": 130, "tgkill": 131, "rt_sigqueueinfo": 138,
         "rt_tgsigqueueinfo": 240, "pidfd_send_signal": 424, "ptrace": 117,
         "process_vm_readv": 270, "process_vm_writev": 271, "fchmod": 52, "fchmodat": 53,
         "fchmodat2": 452, "fchownat": 54, "fchown": 55, "setxattr": 5, "lsetxattr": 6,
         "fsetxattr": 7, "removexattr": 14, "lremovexattr": 15, "fremovexattr": 16,
         "utimensat": 88},
    ),
}
# fmt: on

LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.syscall.restype = ctypes.c_long


class SetupError(Exception):
    """A confinement step the kernel refused: the program must not run."""


def _call(name: str, result: int) -> int:
    if result < 0:
        raise SetupError(f"{name}: {os.strerror(ctypes.get_errno())}")
    return result


def _syscall(name: str, number: int, *args: int | bytes | None) -> int:
    """``syscall(2)``, integers passed as C longs (it is variadic)."""
    wide = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    return _call(name, LIBC.syscall(ctypes.c_long(number), *wide))


def _prctl(name: str, *args: int | object) -> None:
    wide = [ctypes.c_ulong(a) if isinstance(a, int) else a for a in args]
    _call(name, LIBC.prctl(*wide))


def limit_resources(cpu_seconds: int) -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    for which, value in (
        (resource.RLIMIT_AS, MEMORY_BYTES),
        (resource.RLIMIT_FSIZE, FILE_BYTES),
        (resource.RLIMIT_NOFILE, OPEN_FILES),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(which, (value, value))


def drop_capabilities() -> None:
    """Empty effective, permitted and inheritable sets (``_LINUX_CAPABILITY_VERSION_3``)."""
    header = struct.pack("Ii", 0x20080522, 0)
    data = bytes(24)  # two {effective, permitted, inheritable} words of 32 bits, all zero
    _call("capset", LIBC.capset(header, data))


def landlock(folder: str) -> int:
    """Writes beneath ``folder`` only (plus TCP and scope rules where the ABI has them);
    returns the ABI version."""
    try:
        abi = _syscall("Landlock", LANDLOCK_CREATE_RULESET, None, 0, RULESET_VERSION)
    except SetupError as e:
        raise SetupError(f"{e} (Landlock needs Linux 5.13 or later, with it enabled)") from e
    fs = FS_WRITE_ABI1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0)
    fs |= FS_IOCTL_DEV if abi >= 5 else 0
    attr = struct.pack("Q", fs)
    if abi >= 4:
        attr += struct.pack("Q", NET_BIND_TCP | NET_CONNECT_TCP)
    if abi >= 6:
        attr += struct.pack("Q", SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL)
    ruleset = _syscall("landlock_create_ruleset", LANDLOCK_CREATE_RULESET, attr, len(attr), 0)
    beneath = os.open(folder, os.O_PATH | os.O_CLOEXEC)
    rule = struct.pack("=Qi", fs, beneath)  # landlock_path_beneath_attr is packed
    _syscall("landlock_add_rule", LANDLOCK_ADD_RULE, ruleset, RULE_PATH_BENEATH, rule, 0)
    _syscall("landlock_restrict_self", LANDLOCK_RESTRICT_SELF, ruleset, 0)
    os.close(beneath)
    os.close(ruleset)
    return abi


def seccomp_filter(machine: str) -> bytes:
    """The classic-BPF program: the native arch only, EPERM for the ``DENIED`` calls."""
    if machine not in DENIED:
        raise SetupError(f"no seccomp filter for {machine} (x86_64 and aarch64 only)")
    arch, calls = DENIED[machine]
    numbers = sorted(set(calls.values()))
    code = [(LD_W_ABS, 0, 0, 4), (JEQ_K, 1, 0, arch), (RET_K, 0, 0, RET_KILL), (LD_W_ABS, 0, 0, 0)]
    checks = [(JGE_K, 0, 0, X32_BIT)] if machine == "x86_64" else []  # x32 calls: denied
    checks += [(JEQ_K, 0, 0, n) for n in numbers]
    for i, (op, _, _, k) in enumerate(checks):
        code.append((op, len(checks) - i, 0, k))  # jump over the later checks and ALLOW
    code += [(RET_K, 0, 0, RET_ALLOW), (RET_K, 0, 0, RET_EPERM)]
    return b"".join(struct.pack("HBBI", *ins) for ins in code)


def install_seccomp(program: bytes) -> None:
    buffer = ctypes.create_string_buffer(program)

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = Prog(len(program) // 8, ctypes.addressof(buffer))
    _prctl("seccomp", PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0)


def confine(folder: str, cpu_seconds: int) -> None:
    if not sys.platform.startswith("linux"):
        raise SetupError(f"the sandbox needs Linux (this is {sys.platform})")
    limit_resources(cpu_seconds)
    drop_capabilities()
    _prctl("no_new_privs", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    landlock(folder)
    install_seccomp(seccomp_filter(platform.machine()))


def main(argv: list[str]) -> int:
    folder, cpu_seconds = argv[0], int(argv[1])
    path = os.path.join(folder, "program.py")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    try:
        confine(folder, cpu_seconds)
    except (SetupError, OSError, ValueError) as e:
        print(f"sandbox: {e}", file=sys.stderr, flush=True)
        return SETUP_FAILED
    try:
        exec(compile(source, path, "exec"), {"__name__": "__main__", "__file__": path})
    except BaseException as e:  # SystemExit too: only a normal return passes
        print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


def _exit(status: int) -> None:
    """Flush what the program printed, then leave without the interpreter's shutdown (where
    the program's ``atexit`` handlers and finalizers would run, outside the verdict)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # the program closed or broke it
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    _exit(main(sys.argv[1:]))
