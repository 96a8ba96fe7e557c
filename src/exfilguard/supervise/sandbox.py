"""The inside's sandbox under `exfilguard up`: bubblewrap (bwrap) namespaces and, as root, its own user.

The threat model assumes the inside is compromised. On one host the operating system must then
keep it from everything but the meter:

- its own network namespace with only loopback: no route to the outside's or the meter's ports,
  or anywhere else; the meter reaches it over a UNIX socket in a directory bound into the sandbox;
- its own PID namespace: it cannot see, signal or ptrace the meter, the outside or the supervisor;
- its own mount namespace built from nothing: read-only system libraries, the Python installation,
  the virtual environment and the model files; never DATA_DIR, the ledger, the keys or the logs
  (masked even when they lie under a tree it may read); a private /tmp;
- as root: the unprivileged user `nobody` (uid 65534) with no capabilities and no_new_privs
  (setpriv); as another user: an unprivileged user namespace (bwrap --unshare-user);
- its own IPC and UTS namespaces, a new session (no TIOCSTI into a terminal), and a cleared
  environment (no secret in an environment variable reaches it).

Why bwrap: a well-kept, small setuid-free tool (Flatpak's) that does exactly this from a
command line, instead of hand-written unshare/mount/pivot_root syscalls.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from exfilguard.errors import ConfigError

SANDBOX_UID = 65534  # nobody: what the inside runs as when `up` runs as root
SANDBOX_GID = 65534
SOCKET_DIR_INSIDE = "/run/exfilguard"  # where the socket directory appears in the sandbox
SOCKET_NAME = "inside.sock"

# Environment variables the inside keeps (by name or prefix); everything else is dropped.
_ENV_KEEP = ("PATH", "PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONHASHSEED", "LANG", "LC_ALL", "TZ")
_ENV_PREFIXES = ("OMP_", "MKL_", "OPENBLAS_", "TORCH", "CUDA_", "NVIDIA_", "TOKENIZERS_")  # not HF_ (HF_TOKEN)
_ETC = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "passwd", "group", "nsswitch.conf", "localtime", "alternatives")
_SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_NAMESPACES = ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
               "--die-with-parent", "--new-session"]


@dataclass
class Sandbox:
    """How the inside is confined: what it may read, what is masked, where its socket lives."""

    readable: list[Path]  # trees bound read-only (Python, the venv, the code, model files)
    hidden: list[Path]  # DATA_DIR, the ledger, keys and logs: masked if under a readable tree
    socket_dir: Path  # bound read-write at SOCKET_DIR_INSIDE; the meter connects to the socket in it
    device: str = "cpu"
    as_root: bool = field(default_factory=lambda: os.geteuid() == 0)

    @property
    def socket_host_path(self) -> Path:
        """The inside's socket as the meter (outside the sandbox) sees it."""
        return self.socket_dir / SOCKET_NAME

    @property
    def socket_inside_path(self) -> str:
        return f"{SOCKET_DIR_INSIDE}/{SOCKET_NAME}"

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` run inside the sandbox (bwrap [options] -- [setpriv ...] argv)."""
        return [*self._bwrap(), *self._drop_privileges(), *argv]

    def _bwrap(self) -> list[str]:
        bw = [bwrap_path(), *_NAMESPACES]
        if not self.as_root:
            bw += ["--unshare-user", "--cap-drop", "ALL"]
        bw += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/tmp", "--perms", "0755", "--dir", "/run"]
        for p in _SYSTEM:
            if os.path.islink(p):
                bw += ["--symlink", os.readlink(p), p]
            elif os.path.isdir(p):
                bw += ["--ro-bind", p, p]
        for name in _ETC:
            bw += ["--ro-bind-try", f"/etc/{name}", f"/etc/{name}"]
        if self.device != "cpu":
            # A GPU: its device nodes and the sysfs the driver reads.
            bw += ["--ro-bind", "/sys", "/sys"]
            for dev in sorted(Path("/dev").glob("nvidia*")) + sorted(Path("/dev/dri").glob("*")):
                bw += ["--dev-bind", str(dev), str(dev)]
        trees = _outermost(self.readable)
        # bwrap makes missing parent directories 0700 (root's): the sandbox's user could not walk them.
        parents = sorted({str(a) for t in trees for a in t.parents if str(a) != "/"} - set(_SYSTEM) - {"/etc", "/run", "/tmp"})
        for d in parents:
            bw += ["--perms", "0755", "--dir", d]
        for tree in trees:
            bw += ["--ro-bind", str(tree), str(tree)]
        for h in self.hidden:
            if any(_under(h, tree) for tree in self.readable):
                # Mounted over: the tree stays readable, this part of it is empty in the sandbox.
                bw += ["--tmpfs", str(h)] if h.is_dir() else ["--ro-bind", "/dev/null", str(h)]
        bw += ["--bind", str(self.socket_dir), SOCKET_DIR_INSIDE, "--chdir", "/tmp", "--clearenv"]
        for k, v in sandbox_env().items():
            bw += ["--setenv", k, v]
        return [*bw, "--"]

    def _drop_privileges(self) -> list[str]:
        if not self.as_root:
            return []
        # After bwrap built the namespaces as root: become nobody, keep no capability, gain none by exec.
        return [shutil.which("setpriv") or "/usr/bin/setpriv", f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_GID}",
                "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]


def bwrap_path() -> str:
    """The bwrap binary; ConfigError naming the fix when it is missing."""
    path = shutil.which("bwrap")
    if path is None:
        raise ConfigError("the inside's sandbox needs bubblewrap (bwrap), which is not installed: "
                          "`apt-get install bubblewrap` (make up does it), or pass --no-isolate to run the inside unisolated")
    return path


def sandbox_env() -> dict[str, str]:
    """The inside's environment: what Python, torch and the tokenizer need; no secret of ours."""
    env = {k: v for k, v in os.environ.items() if k in _ENV_KEEP or k.startswith(_ENV_PREFIXES)}
    env.setdefault("PATH", "/usr/bin:/bin")
    # No network in the sandbox: Hugging Face libraries must not try it.
    env.update(HOME="/tmp", USER="nobody", LOGNAME="nobody", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def python_trees(model_specs: list[str]) -> list[Path]:
    """What the inside must read: the Python installation, the venv, exfilguard's code, PYTHONPATH,
    and the files named by model specs (hf:PATH, student:PATH, ...)."""
    import exfilguard

    trees = [Path(sys.base_prefix), Path(sys.prefix), Path(sys.executable).parent,
             Path(exfilguard.__file__).parent.parent]
    trees += [Path(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    for spec in model_specs:
        while spec.startswith("match:"):  # match:SPEC wraps another spec
            spec = spec[len("match:"):]
        kind, sep, rest = spec.partition(":")
        if sep and kind != "openai":  # hf:PATH[?gguf=F], student:PATH, ngram:PATH, exact:PATH
            trees.append(Path(rest.partition("?")[0]))
    out: list[Path] = []
    for t in trees:
        for p in (t.absolute(), t.resolve()):  # both: a symlinked venv must resolve inside the sandbox too
            if p.exists() and p not in out:
                out.append(p)
    return out


def socket_dir_for(data_dir: Path) -> Path:
    """Where the inside's socket lives on the host: DATA_DIR/inside-socket (the same across restarts),
    or a directory named after DATA_DIR under /tmp when that path is too long for a UNIX socket."""
    d = Path(data_dir).resolve() / "inside-socket"
    if len(str(d / SOCKET_NAME)) > 100:  # sun_path holds 108 bytes
        import hashlib

        d = Path(tempfile.gettempdir()) / ("exfilguard-inside-" + hashlib.sha256(str(d).encode()).hexdigest()[:16])
    return d


def prepare_socket_dir(d: Path, as_root: bool | None = None) -> None:
    """Make the socket's directory, writable by the sandbox's user only, without a stale socket."""
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    if d.is_symlink() or not d.is_dir():
        raise ConfigError(f"{d} must be a directory (the inside's socket lives there)")
    if os.geteuid() == 0 if as_root is None else as_root:
        os.chown(d, SANDBOX_UID, SANDBOX_GID)
    os.chmod(d, 0o700)
    (d / SOCKET_NAME).unlink(missing_ok=True)


def check_available(as_root: bool | None = None) -> None:
    """Raise ConfigError, saying what is missing and how to fix it, when the sandbox cannot start here."""
    root = os.geteuid() == 0 if as_root is None else as_root
    probe = Sandbox(readable=[], hidden=[], socket_dir=Path(tempfile.gettempdir()), as_root=root)
    try:
        r = subprocess.run(probe.wrap(["/bin/true"]), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"the inside's sandbox (bwrap) cannot start here: {exc}; pass --no-isolate to run the inside unisolated") from None
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
        need = ("bwrap needs the right to create namespaces (in a container: --privileged or CAP_SYS_ADMIN)" if root else
                "run `up` as root, or enable unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, "
                "user.max_user_namespaces > 0; on Ubuntu 24.04 also kernel.apparmor_restrict_unprivileged_userns=0)")
        raise ConfigError(f"the inside's sandbox (bwrap) cannot start here ({why}): {need}; "
                          "or pass --no-isolate to run the inside unisolated (it could then reach the ledger, the keys and the meter)")


def check_layout(readable: list[Path], hidden: list[Path]) -> None:
    """ConfigError when a private path (DATA_DIR, the ledger's or the key's directory) holds code or
    models the inside must read: masking it would hide those too, and not masking it would show it."""
    for h in hidden:
        for tree in readable:
            if _under(tree, h):
                raise ConfigError(f"{h} holds {tree}, which the inside's sandbox must read, and also the ledger, keys "
                                  "or logs it must not: keep DATA_DIR, the ledger and the signing key in a directory of their own")


def _under(p: Path, tree: Path) -> bool:
    return p == tree or tree in p.parents


def _outermost(trees: list[Path]) -> list[Path]:
    """Trees not inside another one (bound once each)."""
    return [t for t in trees if not any(o != t and _under(t, o) for o in trees)]


__all__ = ["SANDBOX_UID", "Sandbox", "bwrap_path", "check_available", "check_layout", "prepare_socket_dir", "python_trees", "sandbox_env", "socket_dir_for"]
