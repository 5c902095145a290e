"""The ``referral-broker`` command: thin click commands over the library, one module per group."""
