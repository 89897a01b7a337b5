"""Process lifecycle and health: components started in a declared order, readiness, measured health."""
