"""Usage and performance analytics: records of LLM calls, tool calls, runs, connections and requests, sent to
ClickHouse (a server, or chDB embedded) without ever blocking; prices; the usage API."""
