"""Running a federation's rounds: the ServerApp, its strategy wrappers, data agreement, identity and tracking."""
