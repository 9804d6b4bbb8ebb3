"""Ray entry points: ``python -m jobs.NAME`` locally or through ``ray job submit``.

The only package that imports ray: each job wires ``knowfree_core``'s plain callables into
Ray Data, Ray Train or Ray Tune.
"""
