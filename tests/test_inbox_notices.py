"""The urgent-referral e-mail, against a local SMTP server the test runs (stdlib asyncio, on a
loopback port): routed through the real router and ingested from the real broker, a new urgent
referral is mailed to its team as a link, with nothing about the family in the mail; a routine
one is not mailed; a mail server that is away does not stop ingest."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from email import message_from_bytes
from email.message import Message

import pytest
from test_inbox_fixtures import OTHER_TEAM, TEAM, make_pipeline, make_store

from referral_broker.config import Settings
from referral_broker.consumers.inbox.ingest import TeamIngest
from referral_broker.consumers.inbox.notices import UrgentNotifier, mail_addresses
from referral_broker.errors import ConfigError


class SmtpSink:
    """A minimal SMTP server on 127.0.0.1 (a free port) keeping every message it is given."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], Message]] = []
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="smtp-sink")

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        rcpt: list[str] = []
        writer.write(b"220 sink ready\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                writer.write(b"250 sink\r\n")
            elif verb == b"RCPT":
                rcpt.append(line.decode().split(":", 1)[1].strip().strip("<>"))
                writer.write(b"250 ok\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go on\r\n")
                await writer.drain()
                data = await reader.readuntil(b"\r\n.\r\n")
                self.messages.append((rcpt, message_from_bytes(data[:-5])))
                rcpt = []
                writer.write(b"250 kept\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                break
            else:  # MAIL, RSET, NOOP
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._session, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()
        server.close()
        self.loop.run_until_complete(server.wait_closed())
        self.loop.close()

    def __enter__(self) -> SmtpSink:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as s:
        yield s


def test_a_new_urgent_referral_is_mailed_as_a_link_only(topics: Settings, sink: SmtpSink) -> None:
    settings = topics.replace(
        inbox_smtp_host="127.0.0.1",
        inbox_smtp_port=sink.port,
        inbox_urgent_mail_to=f"{TEAM}=fenland-team@council.example, {OTHER_TEAM}=cambridge@council.example",
        inbox_public_url="https://inbox.council.example/",
    )
    pipeline = make_pipeline(settings)
    store = make_store(settings)
    urgent = pipeline.referral(TEAM, 31, priority="urgent")
    routine = pipeline.referral(TEAM, 32, priority="routine")
    pipeline.send_referrals([urgent, routine])
    assert pipeline.route(routed=2) == (2, 0)
    notifier = UrgentNotifier.from_settings(settings)
    assert notifier is not None
    worker = TeamIngest(settings, TEAM, store, pipeline.format([TEAM, OTHER_TEAM]), notifier=notifier)
    try:
        assert worker.run(stop_when_idle=3.0).new == 2
    finally:
        store.close()
    assert len(sink.messages) == 1 and notifier.sent == 1
    to, mail = sink.messages[0]
    assert to == ["fenland-team@council.example"]
    assert mail["Subject"] == "New urgent Early Help referral"
    body = mail.get_payload(decode=True).decode()
    assert f"https://inbox.council.example/referrals/{urgent['referral_id']}" in body
    child = urgent["child"]
    everything = str(mail) + body
    for value in (
        child["given_name"],
        child["family_name"],
        child["address"]["postcode"],
        urgent["referrer"]["organisation"],
    ):
        assert value not in everything


def test_no_mail_server_does_not_stop_ingest(topics: Settings) -> None:
    settings = topics.replace(
        inbox_smtp_host="127.0.0.1", inbox_smtp_port=1, inbox_urgent_mail_to=f"{TEAM}=fenland@council.example"
    )
    pipeline = make_pipeline(settings)
    store = make_store(settings)
    pipeline.send_referrals([pipeline.referral(TEAM, 33, priority="urgent")])
    assert pipeline.route(routed=1) == (1, 0)
    notifier = UrgentNotifier(settings)
    try:
        stats = TeamIngest(settings, TEAM, store, pipeline.format([TEAM]), notifier=notifier).run(
            stop_when_idle=3.0
        )
    finally:
        store.close()
    assert stats.new == 1 and notifier.sent == 0


def test_mail_settings_are_checked() -> None:
    assert mail_addresses("") == {}
    assert mail_addresses(f"{TEAM}=a@b.example") == {TEAM: "a@b.example"}
    for bad in ("a@b.example", f"{TEAM}=not-an-address", "no-such-team=a@b.example"):
        with pytest.raises(ConfigError):
            mail_addresses(bad)
