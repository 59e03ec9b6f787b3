"""What a client lends a build: context sync, secrets, ssh agents, registry credentials."""
