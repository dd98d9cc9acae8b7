"""Debian's tinyproxy run by a test as an HTTP forward proxy on loopback, its log kept so
tests can see which requests went through it; stopped by pid."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from testkit.registryd import free_port
from testkit.waiting import listening, stop_process, wait_until

needs_tinyproxy = pytest.mark.skipif(not shutil.which("tinyproxy"), reason="needs tinyproxy")


class Tinyproxy:
    def __init__(self, tmp: Path, name: str = "tinyproxy") -> None:
        self.dir = tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        conf = self.dir / "tinyproxy.conf"
        conf.write_text(f"Port {self.port}\nListen 127.0.0.1\nTimeout 60\nLogLevel Info\n"
                        "MaxClients 64\nAllow 127.0.0.1\nDisableViaHeader Yes\n")
        self.log_path = self.dir / "tinyproxy.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(["tinyproxy", "-d", "-c", str(conf)],
                                     stdout=self._log, stderr=self._log)
        try:
            wait_until(lambda: listening(self.port), 10, "tinyproxy listening", alive=self.proc)
        except AssertionError as exc:
            self.stop()
            raise RuntimeError(f"{exc}: {self.log_path.read_text()[-2000:]}") from None

    def requests(self) -> list[tuple[str, str]]:
        """(method, absolute URL) of every request the proxy forwarded so far."""
        self._log.flush()
        text = self.log_path.read_text(errors="replace")
        pattern = r"Request \(file descriptor \d+\): (\w+) (\S+) HTTP/"
        return [(m[1], m[2]) for m in re.finditer(pattern, text)]

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()
