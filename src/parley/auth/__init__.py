"""Accounts and credentials: password hashing, access and refresh tokens, WebSocket tickets, login limits."""
