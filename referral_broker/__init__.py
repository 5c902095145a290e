"""Multi-agency Early Help referral broker.

The top-level folders are the stages of the flow, installed as subpackages of this one:
``schemas`` (the contract) -> ``producers`` (minimise, seal, sign, send) -> ``consumers``
(receive, verify, open, route, dead-letter, inboxes), with ``adapters`` at the partner edge.
This package holds the shared core: errors, config, the Kafka cluster plumbing and the CLI.
"""

__version__ = "0.1.0"
