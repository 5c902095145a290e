"""Notices to a team: an e-mail when an urgent referral arrives in its inbox.

The mail carries a link and nothing else about the referral: no name, no concern, not even the
referrer (mail leaves the council's systems and is kept in mailboxes). Settings: ``[inbox]
smtp_host`` (empty: no mail), ``smtp_port``, ``mail_from``, ``urgent_mail_to`` (``team=address``
pairs, comma-separated) and ``public_url`` (the inbox's address, for the link). Sending is best
effort: a mail server that is away is logged, and the referral is in the inbox (and counted in
its header) whatever happens to the mail.
"""

from __future__ import annotations

import smtplib
from email.message import EmailMessage

from referral_broker.config import Settings
from referral_broker.errors import ConfigError
from referral_broker.parties import all_parties
from referral_broker.structured_log import get_logger

log = get_logger(__name__)


def mail_addresses(setting: str) -> dict[str, str]:
    """``"district-fenland=a@x, district-cambridge=b@y"`` -> {team: address}."""
    found: dict[str, str] = {}
    for pair in (p.strip() for p in setting.split(",") if p.strip()):
        team, sep, address = pair.partition("=")
        if not sep or "@" not in address or team.strip() not in all_parties():
            raise ConfigError(f"[inbox] urgent_mail_to: '{pair}' is not 'team=address' with a known team")
        found[team.strip()] = address.strip()
    return found


class UrgentNotifier:
    """Mails a team a link to each new urgent referral in its inbox."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.addresses = mail_addresses(settings.inbox_urgent_mail_to)
        self.sent = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> UrgentNotifier | None:
        return cls(settings) if settings.inbox_smtp_host else None

    def message(self, team: str, referral_id: str) -> EmailMessage | None:
        to = self.addresses.get(team)
        if to is None:
            return None
        link = f"{self.settings.inbox_public_url.rstrip('/')}/referrals/{referral_id}"
        mail = EmailMessage()
        mail["From"] = self.settings.inbox_mail_from
        mail["To"] = to
        mail["Subject"] = "New urgent Early Help referral"
        mail.set_content(
            "A new urgent referral has arrived in your team's Early Help inbox.\n\n"
            f"Sign in to read it: {link}\n\n"
            "This message says nothing about the family on purpose: the referral is only in the inbox.\n"
        )
        return mail

    def urgent_arrived(self, team: str, referral_id: str) -> bool:
        mail = self.message(team, referral_id)
        if mail is None:
            return False
        try:
            with smtplib.SMTP(
                self.settings.inbox_smtp_host, self.settings.inbox_smtp_port, timeout=10
            ) as smtp:
                smtp.send_message(mail)
        except (OSError, smtplib.SMTPException) as exc:
            log.warning(
                "urgent notice not mailed", team=team, referral_id=referral_id, error=type(exc).__name__
            )
            return False
        self.sent += 1
        log.info("urgent notice mailed", team=team, referral_id=referral_id)
        return True
