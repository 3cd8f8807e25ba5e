"""Remote bench/run over SSH against a real, throwaway OpenSSH server on 127.0.0.1 (the test's own
sshd with its own host key, user key and config; nothing of the machine's ssh set-up is used)."""
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from devices import DeviceError, create_runner
from devices.bench import SCHEMA, check_result
from devices.remote import remote_bench, remote_run


def _sshd_binary():
    for p in (shutil.which("sshd"), "/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd"):
        if p and os.access(p, os.X_OK):
            return str(Path(p).resolve())
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A running sshd on 127.0.0.1:PORT that accepts a throwaway key for the current user; yields the
    keyword arguments remote_bench/remote_run need to reach it (host key pinned, no user ssh config)."""
    sshd_bin = _sshd_binary()
    missing = [b for b in ("ssh", "scp", "ssh-keygen") if shutil.which(b) is None] + ([] if sshd_bin else ["sshd"])
    if missing:
        pytest.skip(f"OpenSSH not installed ({', '.join(missing)} missing); `make test` installs "
                    "openssh-server and openssh-client as root")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"hetero-test-{name}", "-f", str(d / name)],
                       check=True, capture_output=True)
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    for name in ("host_key", "user_key", "authorized_keys"):
        os.chmod(d / name, 0o600)
    port = _free_port()
    (d / "sshd_config").write_text(f"""\
ListenAddress 127.0.0.1
Port {port}
HostKey {d / 'host_key'}
PidFile {d / 'sshd.pid'}
AuthorizedKeysFile {d / 'authorized_keys'}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
AllowUsers {getpass.getuser()}
PrintMotd no
Subsystem sftp internal-sftp
LogLevel INFO
""")
    known = d / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} " + " ".join((d / "host_key.pub").read_text().split()[:2]) + "\n")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    log = open(d / "sshd.log", "wb")
    proc = subprocess.Popen([sshd_bin, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                pytest.fail(f"sshd exited with {proc.returncode}: {(d / 'sshd.log').read_text()[-500:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"sshd did not listen on port {port}: {(d / 'sshd.log').read_text()[-500:]}")
                time.sleep(0.05)
        yield {"host": f"{getpass.getuser()}@127.0.0.1", "port": port, "identity": d / "user_key", "log": d / "sshd.log",
               "ssh_options": ("-F", "/dev/null", "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
                               "-o", "GlobalKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR")}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _kw(sshd, tmp_path, **extra):
    """remote_* keyword arguments for the test sshd: this interpreter remotely, and a remote temp root
    we can watch (the "remote" is this machine)."""
    root = tmp_path / "remote-tmp"
    root.mkdir(exist_ok=True)
    kw = {k: v for k, v in sshd.items() if k not in ("host", "log")}
    return {**kw, "python": sys.executable, "remote_tmp": str(root), **extra}


def test_remote_bench_and_run_over_ssh(tmp_path, sshd, saved, synth, prep):
    kw = _kw(sshd, tmp_path)
    res = remote_bench(saved / "export", sshd["host"], batch_sizes=(1, 4), iters=3, warmup=1, threads=1, **kw)
    assert check_result(res)["schema"] == SCHEMA and res["label"] == "measured"
    assert [r["batch"] for r in res["results"]] == [1, 4] and all(r["iterations"] == 3 for r in res["results"])
    assert res["settings"] == {"threads": 1} and res["runner"] == "onnxruntime"
    assert res["remote"]["host"] == sshd["host"] and res["remote"]["python"] == sys.executable
    assert res["host"]["hostname"] and res["host"]["cores"] >= 1  # the runner's own description of the remote
    manifest = json.loads((saved / "export" / "manifest.json").read_text())
    assert res["artifact"]["path"] == str(saved / "export" / "edge.onnx")
    assert res["artifact"]["sha256"] == manifest["artifacts"][0]["sha256"]
    assert res["remote"]["artifact_path"].endswith("/export/edge.onnx")
    assert list((tmp_path / "remote-tmp").iterdir()) == []  # the remote directory is gone

    x = prep.apply(synth[1].images[:40])
    got = remote_run(saved / "export", sshd["host"], x, batch_size=16, **kw)
    with create_runner(saved / "export", batch_size=16) as r:
        ref = r.embed(x)
    assert got.dtype == np.float32 and got.shape == (40, 16)
    assert np.abs(got - ref).max() == 0
    assert list((tmp_path / "remote-tmp").iterdir()) == []

    # keep=True leaves the directory (and says where): manifest, artifact, runner, result
    res = remote_bench(saved / "export", sshd["host"], profile="host-cpu-1thread", batch_sizes=(2,), iters=2, warmup=0,
                       keep=True, **kw)
    kept = Path(res["remote"]["dir"])
    assert kept.parent == tmp_path / "remote-tmp" and res["profile"]["name"] == "host-cpu-1thread"
    assert sorted(p.name for p in kept.iterdir()) == ["export", "result.json", "runner.zip"]
    assert sorted(p.name for p in (kept / "export").iterdir()) == ["edge.onnx", "manifest.json"]
    shutil.rmtree(kept)


def test_remote_errors_are_one_line_and_clean_up(tmp_path, sshd, saved):
    kw = _kw(sshd, tmp_path)
    # a failed remote run: the remote runner's own error line, the remote directory removed
    with pytest.raises(DeviceError) as e:
        remote_run(saved / "export", sshd["host"], np.zeros((2, 3, 28, 28), np.float32), **kw)
    msg = str(e.value)
    assert msg.startswith("on " + sshd["host"] + ": input batch has shape (2, 3, 28, 28)") and "\n" not in msg
    assert list((tmp_path / "remote-tmp").iterdir()) == []

    # a host without the runtime: a remote python that cannot import onnxruntime
    wrapper = tmp_path / "python-without-onnxruntime"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import runpy, sys; sys.modules[\"onnxruntime\"] = None; "
                       "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name=\"__main__\")' \"$@\"\n")
    wrapper.chmod(0o755)
    with pytest.raises(DeviceError) as e:
        remote_bench(saved / "export", sshd["host"], batch_sizes=(1,), iters=1, **{**kw, "python": str(wrapper)})
    msg = str(e.value)
    assert "onnxruntime is not installed" in msg and "pip install 'hetero[onnx]'" in msg and "\n" not in msg, msg
    assert list((tmp_path / "remote-tmp").iterdir()) == []

    # no such interpreter there
    with pytest.raises(DeviceError, match=r"exit 127.*python9\.99"):
        remote_bench(saved / "export", sshd["host"], iters=1, **{**kw, "python": "python9.99"})
    assert list((tmp_path / "remote-tmp").iterdir()) == []

    # unreachable: a closed port
    with pytest.raises(DeviceError) as e:
        remote_bench(saved / "export", "127.0.0.1", iters=1, **{**kw, "port": _free_port(), "connect_timeout": 3})
    msg = str(e.value)
    assert msg.startswith("cannot reach 127.0.0.1 over ssh (exit 255)") and "Connection refused" in msg and "\n" not in msg

    # a key the server does not accept
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True, capture_output=True)
    with pytest.raises(DeviceError, match=r"cannot reach .* \(exit 255\): .*Permission denied"):
        remote_bench(saved / "export", sshd["host"], iters=1, **{**kw, "identity": other})


def test_remote_refuses_bad_arguments_before_connecting(tmp_path, saved, monkeypatch):
    with pytest.raises(DeviceError, match="invalid host"):
        remote_bench(saved / "export", "-oProxyCommand=evil")
    with pytest.raises(DeviceError, match="artifact of precision int8"):
        remote_bench(saved / "export", "localhost", precision="int8")
    with pytest.raises(DeviceError, match="runs checkpoints"):
        remote_bench(saved / "edge", "localhost", runtime="torch")
    monkeypatch.setenv("PATH", str(tmp_path))  # no ssh, no scp
    with pytest.raises(DeviceError, match="ssh and scp not found on this machine; install the OpenSSH client"):
        remote_bench(saved / "export", "localhost")


def test_remote_and_standalone_import_neither_torch_nor_hetero():
    code = ("import sys; sys.modules.update(torch=None, hetero=None, export=None); import devices.remote, devices.standalone; "
            "bad = [m for m, v in sys.modules.items() if v is not None and m.split('.')[0] in ('torch', 'hetero', 'export')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hetero_bench_host_as_typed(tmp_path, sshd, saved):
    """`hetero bench EXPORT --host user@host` in its own process, as a user types it; and an
    unreachable host as one line, exit 2."""
    exe = Path(sys.executable).with_name("hetero")
    opts = [f"--ssh-option={o}" for o in sshd["ssh_options"] if o != "-o"]
    opts = [f"--ssh-option=-o{o.split('=', 1)[1]}" if o.startswith("--ssh-option=") and "=" in o.split("=", 1)[1]
            and not o.split("=", 1)[1].startswith("-") else o for o in opts]
    out = tmp_path / "lat.json"
    base = [str(exe), "bench", str(saved / "export"), "--host", sshd["host"], "--port", str(sshd["port"]),
            "--identity", str(sshd["identity"]), "--python", sys.executable, "--batch", "1", "--iters", "3", "--quiet",
            *opts]
    p = subprocess.run([*base, "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert res["remote"]["host"] == sshd["host"] and res["results"][0]["iterations"] == 3
    assert "| 1 | 3 |" in p.stdout
    bad = [*base[:5], "--host", sshd["host"], "--port", str(_free_port()), *base[7:]]
    p = subprocess.run(bad, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "cannot reach" in p.stderr


def _connections(sshd) -> int:
    return Path(sshd["log"]).read_text(errors="replace").count("Accepted publickey")


def test_one_connection_per_call_and_nothing_left_locally(tmp_path, sshd, saved, monkeypatch):
    """A bench copies, runs, copies back and cleans up over one SSH connection (a control master),
    whose socket directory is gone afterwards, as is the master."""
    local = Path(tempfile.mkdtemp(prefix="hs", dir="/tmp"))  # short: a socket path has ~104 bytes
    monkeypatch.setattr(tempfile, "tempdir", str(local))
    try:
        before = _connections(sshd)
        res = remote_bench(saved / "export", sshd["host"], batch_sizes=(1,), iters=1, warmup=0, **_kw(sshd, tmp_path))
        assert res["results"][0]["iterations"] == 1
        time.sleep(0.2)  # sshd writes its log line asynchronously
        assert _connections(sshd) - before == 1
        assert list(local.iterdir()) == []  # no control socket directory, no staging directory
        assert list((tmp_path / "remote-tmp").iterdir()) == []
        masters = subprocess.run(["pgrep", "-f", f"ControlPath={local}"], capture_output=True, text=True).stdout.split()
        assert masters == [], masters
    finally:
        shutil.rmtree(local, ignore_errors=True)


def test_a_step_that_hangs_is_stopped_and_cleaned_up(tmp_path, sshd, saved):
    """The remote interpreter hangs: stopped after ``timeout`` seconds, one line, the remote directory
    removed all the same."""
    wrapper = tmp_path / "python-that-hangs"
    wrapper.write_text(f"#!/bin/sh\nsleep 8\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    t0 = time.monotonic()
    with pytest.raises(DeviceError) as e:
        remote_bench(saved / "export", sshd["host"], batch_sizes=(1,), iters=1, **_kw(sshd, tmp_path, python=str(wrapper),
                                                                                      timeout=2))
    msg = str(e.value)
    assert "took longer than 2 s and was stopped" in msg and "--timeout" in msg and "\n" not in msg, msg
    assert time.monotonic() - t0 < 7
    assert list((tmp_path / "remote-tmp").iterdir()) == []
    with pytest.raises(DeviceError, match="timeout and connect_timeout must be positive"):
        remote_bench(saved / "export", sshd["host"], **_kw(sshd, tmp_path, timeout=0))


def test_remote_directory_removed_when_its_path_check_fails(tmp_path, sshd, saved):
    """The shell prints something else than the new directory's path (here: the path has a newline,
    as a start-up file's output would add a line): refused, and the directory it made is removed."""
    odd = tmp_path / "remote-tmp" / "a\nb"
    odd.mkdir(parents=True)
    with pytest.raises(DeviceError, match="not its path; check the remote shell's start-up files"):
        remote_bench(saved / "export", sshd["host"], iters=1, **_kw(sshd, tmp_path, remote_tmp=str(odd)))
    assert list(odd.iterdir()) == []
