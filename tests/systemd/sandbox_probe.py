"""Run by the systemd test as an ExecStartPost= of phigate.service, so with the
unit's own sandbox: prints what the kernel let it do, one `sandbox-probe KEY=RESULT`
line each (the test reads them from the journal). Exits 0 whatever it finds, so the
unit still starts and the test, not systemd, judges."""
import ctypes
import errno
import mmap
import socket


def attempt(key, f):
    try:
        f()
        result = "allowed"
    except OSError as e:
        result = errno.errorcode.get(e.errno, str(e.errno))
    print(f"sandbox-probe {key}={result}", flush=True)


libc = ctypes.CDLL(None, use_errno=True)


def unshare_uts():
    if libc.unshare(0x04000000) != 0:  # CLONE_NEWUTS
        raise OSError(ctypes.get_errno(), "unshare")


# MemoryDenyWriteExecute: no mapping both writable and executable.
attempt("wx_mmap", lambda: mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC))
# RestrictNamespaces: no new namespaces.
attempt("unshare", unshare_uts)
# RestrictAddressFamilies: AF_UNIX, AF_INET, AF_INET6, AF_NETLINK only.
attempt("af_packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM).close())
attempt("af_inet", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close())
# ProtectSystem=strict, and the paths the unit makes writable.
attempt("write_usr", lambda: open("/usr/lib/.phigate-probe", "w").close())
attempt("write_state", lambda: open("/var/lib/phigate/.phigate-probe", "w").close())
