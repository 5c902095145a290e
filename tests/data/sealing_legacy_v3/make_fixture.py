"""How ``tests/data/sealing_legacy_v3`` was made: sealed-format 3 messages (one AEAD per data
class) whose case-sealed copy wraps its data key in mode 2 (a fresh HPKE share per message),
written by the code of commit bd05174, before mode 3 let one wrapped share serve many cases, so
the tests can show that such messages still open after the wrapping changed.

Run once, against that commit's code (``git archive bd05174``), never against today's:

    PYTHONPATH=<that checkout> python tests/data/sealing_legacy_v3/make_fixture.py <out folder>

Everything in it is synthetic: the referral is the sealing tests' sample (tests/data/
sealing_referral.avsc), the keys are throw-away keys made for this fixture and used nowhere else.
"""

from __future__ import annotations

import base64
import json
import shutil
import sys
from pathlib import Path

from referral_broker.sealing import CaseKeyStore, KeyDirectory, KeyStore, MessageSealer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
from test_sealing_support import SCHEMA, sample_referral  # noqa: E402

SENDER, HUB, TEAM = "school-110123", "council", "district-fenland"
NOW = 1_796_100_000.0  # 2026-12-01, inside the fixture keys' validity
# The signature covers the topic, so the test produces to these exact names: a prefix of their
# own keeps them apart from every deployment's and every other test's topics.
INTAKE = "rb-legacy-fixture-v3.referrals.intake.school-110123"
OUT = "rb-legacy-fixture-v3.referrals.out.district-fenland"


def main(out: Path) -> None:
    keys_dir = out / "keys"
    if keys_dir.exists():
        shutil.rmtree(keys_dir)
    stores = {p: KeyStore.create(keys_dir, p, now=NOW - 3600) for p in (SENDER, HUB, TEAM)}
    directory = KeyDirectory(e for s in stores.values() for e in s.public_entries())
    # the bare public entries, as the v1 fixture's file holds them (the test trusts them as given)
    entries = {"keys": [e.to_json() for e in directory.entries()]}
    (out / "directory.json").write_text(json.dumps(entries, indent=1) + "\n", "utf-8")
    record = sample_referral(7)
    intake = MessageSealer(stores[SENDER], directory).seal(
        record, SCHEMA, topic=INTAKE, recipient=HUB, referral_id="ref-0007", referral_version=1, now=NOW
    )
    routed = MessageSealer(stores[HUB], directory, case_keys=CaseKeyStore.open(keys_dir)).seal(
        record,
        SCHEMA,
        topic=OUT,
        recipient=TEAM,
        referral_id="ref-0007",
        referral_version=1,
        case_id="ref-0007",
        extra_headers=[("rb-referrer", SENDER.encode())],
        now=NOW,
    )
    b64 = lambda raw: base64.b64encode(raw).decode("ascii")
    messages = [
        {
            "topic": m.topic,
            "key": b64(m.key),
            "value": b64(m.value),
            "headers": [[n, b64(v)] for n, v in m.headers],
        }
        for m in (intake, routed)
    ]
    doc = {"sealed_at": NOW, "sender": SENDER, "hub": HUB, "team": TEAM, "messages": messages}
    (out / "messages.json").write_text(json.dumps(doc, indent=1) + "\n", "utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
