"""The inbox store: the one object ingest, the web app, the outbound publisher and the
``inbox`` commands hold.

:class:`InboxStore` is the referral tables (:mod:`store_referrals`) and the account tables
(:mod:`store_users`) and the sign-in throttle (:mod:`store_signin`) over one SQLite connection (:mod:`store_database`, which also lists the
tables). It never holds an opened (decrypted) value.
"""

from __future__ import annotations

from referral_broker.consumers.inbox.store_referrals import ReferralTables
from referral_broker.consumers.inbox.store_signin import SignInTables
from referral_broker.consumers.inbox.store_users import UserTables


class InboxStore(ReferralTables, UserTables, SignInTables):
    """One SQLite connection, serialised by a lock; open one store per process or thread.

    ``InboxStore(path)`` opens (creating if needed) the database at ``path``; use it as a
    context manager or call :meth:`close`.
    """
