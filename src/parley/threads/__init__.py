"""Conversation threads and their messages: storage scoped to the owner, paging, counters, history."""
