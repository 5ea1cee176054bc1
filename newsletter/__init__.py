"""newsletter: email subscriptions for a blog.

Layers, top to bottom: `cli` and `web` (parse, render, print); services (what the product does, knowing
nothing of Flask or click); core (configuration, database, models, tokens, rendering, the mail transport).
A module imports only from its own layer or those below; tests/test_layers.py lists each module's layer,
and README.md's Development section says what each one does.
"""
