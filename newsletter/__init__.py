"""newsletter: email subscriptions for a blog.

Layers, top to bottom: `cli` and `web` (parse, render, print); services (subscriptions, signups, roster,
posts, feeds, dispatch, outbox, worker, stats, checks, serving, demo); core (config, db, models, tokens,
text, sanitize, messages, mailer, signing, ratelimit, resources, runtime). A module imports only from its
own layer or those below (tests/test_layers.py).
"""
