"""The REST API: translates HTTP to agent queries and commands; no logic of its own."""
