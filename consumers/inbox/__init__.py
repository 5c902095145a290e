"""The district-team inbox: where Early Help District Teams triage the referrals routed to them.

Flow: ``ingest`` reads a team's out topic into the ``store`` (SQLite; the sealed Kafka record is
kept sealed at rest; ``store_referrals`` holds referrals and events, ``store_users`` accounts and
sessions), ``states`` decides every status change as a pure function, ``app`` serves the
GOV.UK-styled pages (``pages_signin``, ``pages_referrals``, ``pages_errors``) behind ``auth``
(local accounts, signed sessions, CSRF) and ``security`` (CSP, access audit), and ``outbound``
writes status messages and access audit events back to Kafka.

Nothing here stores or logs an opened (decrypted) value: records are opened in memory, only for
a signed-in member of the team viewing one referral, through the injected ``RecordFormat``.
"""
