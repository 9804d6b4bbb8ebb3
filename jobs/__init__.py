"""Ray entry points: ``python -m jobs.NAME`` locally or through ``ray job submit``.

The only package that imports ray: each job wires ``knowfree_core``'s plain callables into
Ray Data, Ray Train or Ray Tune; ``jobs/cli.py`` declares their command lines and is the
``knowfree`` console script. The wheel installs this folder as ``knowfree_jobs`` (a generic
top-level name would collide with other projects), so its modules import each other
relatively.
"""
