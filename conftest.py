"""Repository-level pytest configuration. The harness plugin itself is registered by the installed package
(entry point ``pytest11: knowedit_harness``); nothing else is needed here."""
