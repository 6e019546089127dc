"""The endpoint agent of a backend host: server (TCP_REPAIR export/import), protocol, CLI, and the
applications' SDK.  Standard library only: a backend host installs the base package, without the
gateway's dependencies."""
