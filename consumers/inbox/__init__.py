"""The district-team inbox: where Early Help District Teams triage the referrals routed to them.

Flow: ``ingest`` reads a team's out topic into the ``store`` (SQLite; the sealed Kafka record is
kept sealed at rest), ``states`` decides every status change as a pure function, ``web`` serves
the GOV.UK-styled pages behind ``auth`` (local accounts, signed sessions, CSRF), and
``outbound`` writes status messages and access audit events back to Kafka.

Nothing here stores or logs an opened (decrypted) value: records are opened in memory, only for
a signed-in member of the team viewing one referral, through the injected ``RecordFormat``.
"""
