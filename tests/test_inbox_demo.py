"""``referral-broker demo`` (without --no-serve) ends by serving the inbox with the demo's
referrals in it and prints the address and a sign-in that works."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from test_inbox_cli import env_for, free_port

from referral_broker.config import Settings


def test_demo_serves_the_inbox_with_its_referrals(topics: Settings, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "demo.err"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "referral_broker.cli.main",
                "demo",
                "--per-partner",
                "1",
                "--port",
                str(port),
            ],
            env=env_for(topics),
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
        )
    try:
        deadline = time.monotonic() + 300
        found = None
        while found is None:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            found = re.search(r"Sign in as (\S+) with password (\S+) \((\d+) referral", log.read_text())
            time.sleep(0.5)
        username, password, count = found.group(1), found.group(2), int(found.group(3))
        assert f"http://localhost:{port}/" in log.read_text() and count >= 1
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            while True:
                try:
                    page = client.get("/sign-in")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline
                    time.sleep(0.3)
            token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
            assert token is not None
            signed_in = client.post(
                "/sign-in",
                data={
                    "csrf_token": token.group(1),
                    "username": username,
                    "password": password,
                    "next": "/inbox",
                },
            )
            assert signed_in.status_code == 303
            inbox = client.get("/inbox")
            assert inbox.status_code == 200
            assert len(re.findall(r'data-referral-id="', inbox.text)) == count
            # the router runs beside the inbox: an acknowledgement reaches the referrer, and the
            # inbox says so only once it has
            rid = re.findall(r'data-referral-id="([^"]+)"', inbox.text)[0]
            page = client.get(f"/referrals/{rid}")
            token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
            assert token is not None
            done = client.post(f"/referrals/{rid}/acknowledge", data={"csrf_token": token.group(1)})
            assert done.status_code == 303
            told_by = time.monotonic() + 90
            while "Referrer told" not in client.get(f"/referrals/{rid}").text:
                assert time.monotonic() < told_by, "the demo's router never delivered the status"
                time.sleep(1)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode == 0, log.read_text()
    assert password not in (topics.inbox_db_path.read_bytes().decode("latin-1"))
