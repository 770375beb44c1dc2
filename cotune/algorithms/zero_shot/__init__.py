"""zero-shot: every party evaluated once, before any training (round 0). The smallest algorithm: the README's worked
example of adding one."""
