"""``bench orgs`` (issue 13, Build 4) on the real broker, with a small N: its report holds real
measurements (positive times, counts that follow from N and the topic plan, routed referrals)
and its topics are gone afterwards. The figures themselves are never asserted as targets."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from referral_broker.cli import bench_orgs
from referral_broker.cli.main import cli
from referral_broker.cluster.topics import admin_client
from referral_broker.config import load_settings
from referral_broker.organisations import OrgKind, load_file, normalise_identifier

N = 30  # synthetic organisations in the large run (the real figure is taken with 1,000)
BASELINE = 2  # ... and in the run it is compared with
REFERRALS = 6
SHIPPED = load_file()
RESEARCH = sum(1 for o in SHIPPED if o.kind is OrgKind.RESEARCH)  # research: an out topic only
FIXED_TOPICS = 7  # archive, audit, audit heads, dead letters, keys, registry, deliveries


def per_org_topics(registered: int) -> int:
    """intake, out and status for every partner and district team; out only for research."""
    return 3 * (registered - RESEARCH) + RESEARCH


def test_synthetic_organisations_are_valid_distinct_and_clear_of_the_county() -> None:
    orgs = bench_orgs.synthetic_organisations(1000)
    assert len(orgs) == 1000 and len({o.party for o in orgs}) == 1000
    assert not {o.party for o in orgs} & {o.party for o in SHIPPED}
    kinds = {k: sum(1 for o in orgs if o.kind is k) for k in OrgKind}
    assert kinds[OrgKind.SCHOOL] == 700 and kinds[OrgKind.NHS_ORGANISATION] == 200 and kinds[OrgKind.CHARITY] == 100
    for org in orgs:  # each identifier is already in its one stored, valid form
        assert normalise_identifier(org.kind, org.identifier) == org.identifier
        assert org.name.startswith("Synthetic ") and len(org.districts) == 1


@pytest.mark.timeout(400)
def test_bench_orgs_reports_real_measurements_and_cleans_up(kafka_bootstrap: str, tmp_path: Path) -> None:
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "REFERRAL_BROKER_TOPIC_PROFILE": "test",
        "REFERRAL_BROKER_DATA_DIR": str(tmp_path / "data"),
    }
    args = ["bench", "orgs", "--organisations", str(N), "--baseline", str(BASELINE), "--referrals", str(REFERRALS)]
    started = time.monotonic()
    result = CliRunner().invoke(cli, [*args, "--json"], env=env, catch_exceptions=False)
    took = time.monotonic() - started
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    small, large = data["runs"]
    assert (small["organisations"], large["organisations"]) == (BASELINE, N)
    for run, n in ((small, BASELINE), (large, N)):
        registered = n + len(SHIPPED)
        assert run["registered"] == registered and run["parties"] == registered + 1  # + the hub
        assert run["per_organisation_topics"] == per_org_topics(registered)
        assert run["topics_created"] == per_org_topics(registered)  # every organisation's, first time
        assert run["topics_created_again"] == 0  # and nothing the second time
        # the test profile caps partitions at 2: intake 2, out 1, status 1
        assert run["per_organisation_partitions"] == 4 * (registered - RESEARCH) + RESEARCH
        assert run["key_directory_entries"] == registered + 1 and run["key_directory_refused"] == 0
        router = run["router"]
        assert router["consumed"] == router["routed"] == REFERRALS and router["dead_lettered"] == 0
        assert router["delivered"] >= REFERRALS  # at least the district team, each time
        assert router["referrals_per_s"] > 0 and router["referrals_per_s_wall"] > 0
        assert all(v > 0 for v in run["seconds"].values()), run["seconds"]
        assert set(run["seconds"]) >= {
            "registry_publish_s", "topics_ensure_s", "topics_ensure_again_s", "keys_init_s",
            "key_directory_load_s", "router_wall_s", "router_busy_s", "topics_delete_s",
        }  # fmt: skip
        assert run["deleted_topics"] == per_org_topics(registered) + FIXED_TOPICS
    assert all(v is not None and v > 0 for v in data["ratios_large_over_small"].values())
    if kafka_bootstrap.startswith("127.0.0.1:"):  # the broker is this machine's: its memory is read
        assert data["broker_on_this_machine"] and data["broker_pid"] > 0
        for run in (small, large):
            for when in ("before", "after_topics", "after_router"):
                seen = run["broker_memory"][when]
                assert seen["rss_mb"] > 50 and 0 < seen["heap_used_mb"] <= seen["heap_committed_mb"], seen
    # nothing of either run is left on the broker
    admin = admin_client(load_settings(environ={}, kafka_bootstrap_servers=kafka_bootstrap), kafka_bootstrap)
    try:
        deadline = time.monotonic() + 20
        while True:
            left = [t for t in admin.list_topics() if t.startswith((small["prefix"], large["prefix"]))]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        admin.close()
    assert left == []
    # the human table shows both runs side by side from the same data
    table = bench_orgs.rows(data)
    named: dict[str, Any] = {row[0]: row for row in table}
    assert named["registered organisations"][1:3] == [str(BASELINE + len(SHIPPED)), str(N + len(SHIPPED))]
    assert "topics ensure (creating)" in named and "key directory load (best of 3)" in named
    assert "router: referrals/s (busy)" in named and "broker RSS after topics" in named
    print(f"bench orgs N={N} took {took:.0f} s")
