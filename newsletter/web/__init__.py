"""The web pages: one blueprint per area. Handlers change rows and queue mail; they never talk to SMTP."""
