"""The lab: network namespaces, the seeded test files, the lab's small servers, and the
TCP_REPAIR test topology."""
