"""What a client serves to its builds: secrets, ssh agents (and, under the daemon,
context sync and registry auth), each behind a ``core.session`` Protocol."""
