"""Provisioning and guarding the federation: CA and join kits, the proxy, allowed ServerApps, node reconciliation."""
