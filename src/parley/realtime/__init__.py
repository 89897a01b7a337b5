"""Real-time delivery: the per-thread event log, the event bus, feeds that resume without gaps, the
WebSocket protocol and connections, SSE and the beacon."""
