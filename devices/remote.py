"""Bench or run an export on another machine over SSH: ``remote_bench(export_dir, "pi@raspberrypi")``.

The OpenSSH client binaries (``ssh``, ``scp``) do the work; nothing here speaks the protocol. One
call opens one SSH connection that every step shares (an OpenSSH control master, its socket in a
private local directory), makes a private directory on the host, copies the packed standalone runner
(:func:`devices.standalone.pack_runner`), ``manifest.json`` and the artifact the runtime will load
(its file or package directory, plus side files such as the ORT required-operators config), runs
``python runner.zip bench|run`` there, copies the result back, and removes the directory again,
also when something failed. Every ``ssh``/``scp`` step is bounded by ``timeout`` seconds (the TCP
connect by ``connect_timeout``). The host needs Python 3.8+, numpy and the runtime; not torch, not hetero.

Non-interactive (``BatchMode=yes``): authentication is by key (``identity`` or the agent) and host
keys are checked as the caller's ssh configuration says; pass e.g.
``ssh_options=("-o", "StrictHostKeyChecking=accept-new")`` to change that. ``ssh_options`` go to both
``ssh`` and ``scp``, so use options they share (``-o ...``, ``-F file``, ``-J jump``).

Standard library and numpy only.
"""
from __future__ import annotations

import json
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from devices.artifact import MANIFEST, Artifact, NoSuchArtifact, open_artifact, resolve_inside
from devices.bench import check_result
from devices.errors import DeviceError
from devices.profiles import profile as get_profile
from devices.runner import runner_class
from devices.standalone import pack_runner

REMOTE_PREFIX = "hetero-runner."
TIMEOUT_S = 600.0  # the default bound on one ssh/scp step: a bench of a large model on a slow board fits
CONTROL_PERSIST_S = 60  # the shared connection outlives a crashed caller by at most this long
_REMOTE_DIR = re.compile(r"^/[^\n\0]*/" + re.escape(REMOTE_PREFIX) + r"[A-Za-z0-9]+$")


class _Ssh:
    """``ssh`` and ``scp`` command lines for one host with the caller's options, every one bounded by
    ``timeout`` seconds. As a context manager: one connection (a control master) that the commands
    inside share, closed and its local socket directory removed on the way out."""

    def __init__(self, host: str, *, port: int | None, identity: str | Path | None, ssh_options: Sequence[str],
                 connect_timeout: float, timeout: float = TIMEOUT_S):
        if not host or host.startswith("-") or any(c.isspace() for c in host):
            raise DeviceError(f"invalid host {host!r}; pass [user@]hostname")
        if not timeout > 0 or not connect_timeout > 0:
            raise DeviceError(f"timeout and connect_timeout must be positive seconds, got {timeout} and {connect_timeout}")
        missing = [b for b in ("ssh", "scp") if shutil.which(b) is None]
        if missing:
            raise DeviceError(f"{' and '.join(missing)} not found on this machine; install the OpenSSH client "
                              "(apt-get install openssh-client, or your system's package)")
        if isinstance(ssh_options, str):
            raise DeviceError("ssh_options is a sequence of arguments, e.g. ('-o', 'StrictHostKeyChecking=accept-new')")
        self.host = host
        self.timeout = float(timeout)
        # connecting, making and removing a directory: quick, whatever the bench takes
        self.short = min(self.timeout, max(1, int(connect_timeout)) + 30.0)
        common = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(connect_timeout))}",
                  "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
        if identity is not None:
            common += ["-i", str(Path(identity).expanduser()), "-o", "IdentitiesOnly=yes"]
        common += [str(o) for o in ssh_options]
        port_ssh = ["-p", str(int(port))] if port is not None else []
        port_scp = ["-P", str(int(port))] if port is not None else []
        self.ssh_args = ["ssh", *port_ssh, *common]
        self.scp_args = ["scp", "-q", "-r", *port_scp, *common]
        user, at, name = host.rpartition("@")
        if ":" in name and not name.startswith("["):  # an IPv6 address
            name = f"[{name}]"
        self.scp_host = f"{user}{at}{name}"
        self._control: Path | None = None
        self._mux: list[str] = []  # -o options of the commands that share the connection

    def __enter__(self) -> _Ssh:
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def connect(self) -> None:
        """Open the shared connection (``ssh -M -N -f``): a host that cannot be reached fails here, once.
        Its stderr goes to a file, not a pipe: the master lives on in the background and would hold a
        pipe open until it exits."""
        d = tempfile.mkdtemp(prefix="hetero-ssh-")
        if len(d) > 90:  # a Unix socket path has ~104 bytes at most
            shutil.rmtree(d, ignore_errors=True)
            d = tempfile.mkdtemp(prefix="hetero-ssh-", dir="/tmp")
        self._control = Path(d)
        path = ["-o", f"ControlPath={d}/c"]
        try:
            with open(self._control / "master.log", "wb") as log:
                proc = self._run([*self.ssh_args, "-M", "-N", "-f", *path, "-o", f"ControlPersist={CONTROL_PERSIST_S}",
                                  "--", self.host], "connecting to", self.short, stdout=subprocess.DEVNULL, stderr=log)
            if proc.returncode != 0:
                proc.stderr = (self._control / "master.log").read_bytes()
                self.check(proc, "ssh")
        except BaseException:
            self.close()
            raise
        self._mux = ["-o", "ControlMaster=no", *path]  # the master gone: each falls back to its own connection

    def close(self) -> None:
        """Close the shared connection and remove its socket directory (idempotent, never raises)."""
        if self._mux:
            try:
                subprocess.run([*self.ssh_args, *self._mux, "-O", "exit", "--", self.host], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=self.short)
            except (OSError, subprocess.SubprocessError):
                pass  # ControlPersist ends it soon enough
            self._mux = []
        if self._control is not None:
            shutil.rmtree(self._control, ignore_errors=True)
            self._control = None

    def _run(self, argv: list[str], what: str, timeout: float, **kw) -> subprocess.CompletedProcess:
        if "stdout" not in kw and "stderr" not in kw:
            kw["capture_output"] = True
        try:
            return subprocess.run(argv, stdin=subprocess.DEVNULL, timeout=timeout, **kw)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"{what} {self.host} took longer than {timeout:g} s and was stopped; check the host, "
                              "or allow more time (--timeout, or timeout= in Python)") from None

    def ssh(self, command: str, *, quick: bool = False) -> subprocess.CompletedProcess:
        return self._run([*self.ssh_args, *self._mux, "--", self.host, command], "running a command on",
                         self.short if quick else self.timeout)

    def check(self, proc: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
        """``proc`` if it succeeded, else a one-line error: unreachable (ssh's 255) or ``what`` failed."""
        if proc.returncode == 0:
            return proc
        err = _last_line(proc.stderr)
        if proc.returncode == 255:
            raise DeviceError(f"cannot reach {self.host} over ssh (exit 255): {err or 'no message'}; "
                              "check the host name, port, key and that sshd runs there")
        raise DeviceError(f"{what} on {self.host} failed (exit {proc.returncode}): {err or 'no message'}")

    def upload(self, sources: Sequence[Path], remote_dir: str) -> None:
        proc = self._run([*self.scp_args, *self._mux, "--", *map(str, sources), f"{self.scp_host}:{remote_dir}/"],
                         "copying the runner and artifact to", self.timeout)
        self._check_scp(proc, "copying the runner and artifact to")

    def download(self, remote_path: str, local: Path) -> None:
        proc = self._run([*self.scp_args, *self._mux, "--", f"{self.scp_host}:{remote_path}", str(local)],
                         "copying the result back from", self.timeout)
        self._check_scp(proc, "copying the result back from")

    def _check_scp(self, proc: subprocess.CompletedProcess, what: str) -> None:
        if proc.returncode != 0:
            raise DeviceError(f"scp: {what} {self.host} failed (exit {proc.returncode}): "
                              f"{_last_line(proc.stderr) or 'no message'}")


def _last_line(data: bytes | str | None) -> str:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else (data or "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _runner_error(data: bytes) -> str | None:
    """The remote runner's own one-line ``error: ...`` (the last one), without the prefix."""
    text = data.decode("utf-8", "replace")
    errors = [ln.strip()[len("error:"):].strip() for ln in text.splitlines() if ln.strip().startswith("error:")]
    return errors[-1] if errors else None


def _choose_artifact(export_dir: str | Path, runtime: str, precision: str | None, fmt: str | None) -> Artifact:
    """The artifact the remote runner will load (the local copy, sha256 checked): the same rule as
    ``create_runner``."""
    cls = runner_class(runtime)
    if hasattr(cls, "open_path"):
        raise DeviceError(f"runtime {runtime} runs checkpoints, not exports; remote runs take an export directory "
                          "and a runtime such as onnxruntime")
    if fmt and fmt not in cls.formats:
        raise DeviceError(f"runtime {runtime} runs {', '.join(cls.formats)} artifacts, not {fmt}")
    last: DeviceError | None = None
    for f in ((fmt,) if fmt else cls.formats):
        try:
            return open_artifact(export_dir, f, precision)
        except NoSuchArtifact as e:
            last = e
    assert last is not None
    raise last


def artifact_files(art: Artifact) -> list[str]:
    """The files (relative to the export directory) the artifact needs: its file or package
    directory and side files its entry names (``*_config``, ``*_file``, e.g. the ORT config)."""
    d = Path(art.manifest["_dir"])
    names = [art.entry["file"]]
    for key, value in art.entry.items():
        if isinstance(value, str) and value and (key.endswith("_config") or key.endswith("_file")):
            if resolve_inside(d, value).exists() and value not in names:
                names.append(value)
    return names


def _stage(stage: Path, art: Artifact, extra: dict[str, Path] | None = None) -> list[Path]:
    """``runner.zip``, ``export/`` (manifest.json + the artifact's files) and ``extra`` in ``stage``;
    returns the top-level entries to upload."""

    src = Path(art.manifest["_dir"])
    exp = stage / "export"
    exp.mkdir()
    shutil.copy2(src / MANIFEST, exp / MANIFEST)  # byte for byte: the remote checks the same sha256s
    for name in artifact_files(art):
        s, t = src / name, exp / name
        t.parent.mkdir(parents=True, exist_ok=True)
        if s.is_dir():
            shutil.copytree(s, t)
        else:
            shutil.copy2(s, t)
    tops = [pack_runner(stage / "runner.zip"), exp]
    for name, path in (extra or {}).items():
        shutil.copy2(path, stage / name)
        tops.append(stage / name)
    return tops


def _remote_call(export_dir: str | Path, host: str, command: str, outputs: Sequence[str], *, runtime: str,
                 precision: str | None, fmt: str | None, args: Sequence[str], extra: dict[str, Path] | None,
                 port: int | None, identity: str | Path | None, python: str, ssh_options: Sequence[str],
                 keep: bool, connect_timeout: float, timeout: float, remote_tmp: str | None,
                 local_dir: Path) -> tuple[Artifact, str]:
    """Stage, upload, run ``python runner.zip COMMAND export ARGS`` in a fresh remote directory,
    fetch ``outputs`` into ``local_dir``, remove the remote directory (unless ``keep``). Returns the
    (local) artifact the runner loaded and the remote directory."""
    if not python or not python.strip():
        raise DeviceError("python must name the remote interpreter, e.g. python3 or /opt/venv/bin/python")
    conn = _Ssh(host, port=port, identity=identity, ssh_options=ssh_options, connect_timeout=connect_timeout,
                timeout=timeout)
    art = _choose_artifact(export_dir, runtime, precision, fmt)
    stage = local_dir / "stage"
    stage.mkdir()
    tops = _stage(stage, art, extra)

    # the directory's name is chosen here (unguessable, as mktemp's), so removing it never depends on
    # what the remote shell printed: the same shell word names it for mkdir and for rm
    name = f"{REMOTE_PREFIX}{secrets.token_hex(8)}"
    base = shlex.quote(remote_tmp.rstrip("/") or "/") if remote_tmp else '"${TMPDIR:-/tmp}"'
    target = f"{base}/{name}"
    q = shlex.quote
    with conn:
        try:
            proc = conn.check(conn.ssh(f"mkdir -m 700 -- {target} && printf '%s\\n' {target}", quick=True), "mkdir")
            rdir = _last_line(proc.stdout).replace("//", "/")
            if not _REMOTE_DIR.match(rdir) or not rdir.endswith(f"/{name}"):
                raise DeviceError(f"making a temporary directory on {host} printed {rdir!r}, not its path; "
                                  "check the remote shell's start-up files print nothing")
            conn.upload(tops, rdir)
            # pin the artifact chosen here, so the remote loads that one
            pin = ["--format", art.format] + (["--precision", precision] if precision else [])
            line = " ".join([python, q(f"{rdir}/runner.zip"), command, q(f"{rdir}/export"), *(q(a) for a in [*args, *pin])])
            proc = conn.ssh(f"cd {q(rdir)} && {line}")
            if proc.returncode != 0:
                why = _runner_error(proc.stderr)
                if why is not None:
                    raise DeviceError(f"on {host}: {why}")
                if proc.returncode == 255:
                    conn.check(proc, "the runner")
                hint = f"; is {python.split()[0]} (python=) a Python 3.8+ with numpy there?" if proc.returncode in (126, 127) else ""
                raise DeviceError(f"the runner on {host} failed (exit {proc.returncode}): "
                                  f"{_last_line(proc.stderr) or 'no message'}{hint}")
            for out in outputs:
                conn.download(f"{rdir}/{out}", local_dir / out)
        finally:
            if not keep:  # best effort: never hides the first error, but says so
                _remove(conn, target)
    return art, rdir


def _remove(conn: _Ssh, target: str) -> None:
    try:
        done = conn.ssh(f"rm -rf -- {target}", quick=True)
        why = None if done.returncode == 0 else _last_line(done.stderr) or f"exit {done.returncode}"
    except DeviceError as e:  # timed out
        why = str(e)
    if why:
        warnings.warn(f"could not remove {target} on {conn.host}: {why}", RuntimeWarning, stacklevel=4)


def _runner_args(threads: int | None, providers: Sequence[str] | None) -> list[str]:
    args: list[str] = []
    if threads is not None:
        args += ["--threads", str(int(threads))]
    for p in providers or ():
        args += ["--provider", str(p)]
    return args


def remote_bench(export_dir: str | Path, host: str, *, runtime: str | None = None, precision: str | None = None,
                 fmt: str | None = None, profile: str | None = None, batch_sizes: Sequence[int] = (1, 8, 32),
                 iters: int | None = None, budget_s: float | None = None, warmup: int = 10,
                 threads: int | None = None, providers: Sequence[str] | None = None, port: int | None = None,
                 identity: str | Path | None = None, python: str = "python3", ssh_options: Sequence[str] = (),
                 keep: bool = False, connect_timeout: float = 10, timeout: float = TIMEOUT_S,
                 remote_tmp: str | None = None) -> dict[str, Any]:
    """The latency JSON (``hetero-latency/1``) of the export's artifact measured on ``host``.

    ``runtime`` defaults to onnxruntime, or with ``profile`` (a device profile name: format,
    precision, runtime, settings) to what the profile picks on the host. ``python`` is the remote
    interpreter command (shell words, e.g. ``/opt/venv/bin/python``). The result's ``host`` block
    describes the remote machine; ``remote`` names the host and interpreter; ``artifact.path`` is
    the local artifact (the remote copy, same sha256, is gone).
    """
    choose_rt = runtime or "onnxruntime"
    if profile:
        p = get_profile(profile)
        fmt, precision = fmt or p.fmt, precision or p.precision
        choose_rt = runtime or p.runtime
    if iters is not None and budget_s is not None:
        raise DeviceError("give iters or budget_s, not both")
    if (iters is not None and iters < 1) or (budget_s is not None and not budget_s > 0) or warmup < 0:
        raise DeviceError("iterations and the time budget must be positive, warm-up non-negative")
    sizes = [int(b) for b in batch_sizes]
    if not sizes or min(sizes) < 1:
        raise DeviceError(f"batch sizes must be whole numbers >= 1, got {list(batch_sizes)}")
    args = ["--batch", ",".join(map(str, sizes)), "--warmup", str(int(warmup)), "--json", "result.json"]
    if iters is not None:
        args += ["--iters", str(int(iters))]
    if budget_s is not None:
        args += ["--budget", repr(float(budget_s))]
    if profile:
        args += ["--profile", profile]
    if runtime or not profile:
        args += ["--runtime", choose_rt]
    with tempfile.TemporaryDirectory(prefix="hetero-remote-") as tmp:
        art, rdir = _remote_call(export_dir, host, "bench", ["result.json"], runtime=choose_rt, precision=precision,
                                 fmt=fmt, args=args + _runner_args(threads, providers), extra=None, port=port,
                                 identity=identity, python=python, ssh_options=ssh_options, keep=keep,
                                 connect_timeout=connect_timeout, timeout=timeout, remote_tmp=remote_tmp,
                                 local_dir=Path(tmp))
        try:
            result = json.loads((Path(tmp) / "result.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DeviceError(f"the latency JSON from {host} is unreadable ({e.__class__.__name__})") from None
    result = check_result(result, f"the latency JSON from {host}")
    remote = {"host": host, "python": python, "artifact_path": (result.get("artifact") or {}).get("path")}
    if keep:
        remote["dir"] = rdir
    if isinstance(result.get("artifact"), dict):
        result["artifact"]["path"] = str(art.path)
    result["remote"] = remote
    return result


def remote_run(export_dir: str | Path, host: str, inputs: np.ndarray | str | Path, *, runtime: str = "onnxruntime",
               precision: str | None = None, fmt: str | None = None, batch_size: int = 256,
               threads: int | None = None, providers: Sequence[str] | None = None, port: int | None = None,
               identity: str | Path | None = None, python: str = "python3", ssh_options: Sequence[str] = (),
               keep: bool = False, connect_timeout: float = 10, timeout: float = TIMEOUT_S,
               remote_tmp: str | None = None) -> np.ndarray:
    """Embeddings (float32 [N, dim]) of ``inputs`` (a preprocessed float32 [N, C, H, W] array or a
    ``.npy`` of one) computed on ``host`` by the standalone runner."""
    with tempfile.TemporaryDirectory(prefix="hetero-remote-") as tmp:
        if isinstance(inputs, (str, Path)):
            src = Path(inputs).expanduser()
            if src.suffix.lower() != ".npy" or not src.is_file():
                raise DeviceError(f"{inputs}: remote runs take a preprocessed float32 .npy batch (or an array)")
        else:
            src = Path(tmp) / "input.npy"
            np.save(src, np.asarray(inputs), allow_pickle=False)
        args = ["--input", "input.npy", "--out", "embeddings.npy", "--batch-size", str(int(batch_size)), "--runtime", runtime]
        args += _runner_args(threads, providers)
        _remote_call(export_dir, host, "run", ["embeddings.npy"], runtime=runtime, precision=precision, fmt=fmt,
                     args=args, extra={"input.npy": src}, port=port, identity=identity, python=python,
                     ssh_options=ssh_options, keep=keep, connect_timeout=connect_timeout, timeout=timeout,
                     remote_tmp=remote_tmp, local_dir=Path(tmp))
        try:
            return np.load(Path(tmp) / "embeddings.npy", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DeviceError(f"the embeddings from {host} are unreadable ({e.__class__.__name__})") from None
