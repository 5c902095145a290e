"""The producers' partitioner: kafka-python's (and Java's) keyed choice, its hash remembered."""

from __future__ import annotations

import uuid

from kafka.partitioner.default import DefaultPartitioner

from referral_broker.cluster.clients import KeyedPartitioner


class _Cluster:
    def __init__(self, partitions: dict[str, set[int]]) -> None:
        self.partitions = partitions

    def topics(self) -> set[str]:
        return set(self.partitions)

    def partitions_for_topic(self, topic: str) -> set[int]:
        return self.partitions[topic]

    def available_partitions_for_topic(self, topic: str) -> set[int]:
        return self.partitions[topic]


def test_a_key_goes_to_the_partition_kafkas_default_partitioner_chooses() -> None:
    """A record's partition decides its order among its key's records: a router restarted
    with the other partitioner, or a Java client, must choose the same one."""
    cluster = _Cluster({"one": {0}, "three": {0, 1, 2}, "seven": set(range(7)), "gaps": {0, 2, 5}})
    keyed, default = KeyedPartitioner(size=8), DefaultPartitioner()
    keys = [str(uuid.uuid4()).encode() for _ in range(300)] + [b"", b"a", b"\xff" * 40]
    for key in keys + keys:  # the second time from the remembered hashes (8 kept: mostly cleared)
        for topic in cluster.partitions:
            assert keyed.partition(topic, key, key, None, None, cluster) == default.partition(
                topic, key, key, None, None, cluster
            ), (topic, key)
    assert len(keyed._hashes) <= 8
    # no key: any of the topic's partitions, as kafka-python's
    assert {keyed.partition("three", None, None, None, None, cluster) for _ in range(200)} == {0, 1, 2}
